# Sourced by image recipes that add to a built image (jupyter.sh,
# irkernel.sh): running commands in the image's chroot while it is being
# built. Not a recipe itself; scripts/build-image.sh counts it in the cache
# key of every recipe that sources it.
#
#   chroot_begin "$t"        the network (the host's resolv.conf: bookworm.sh
#                            left it empty, as the runtime binds the real
#                            one), /proc and /dev (apt's gpg wants /dev/null),
#                            for the build only; undone on exit
#   in_chroot CMD...         CMD in the chroot, with a clean environment
#   apt_install PKG...       Debian packages from the image's own apt sources
#   chroot_end               undo chroot_begin, clean apt's caches, and make
#                            everything readable for unprivileged ch-run
#                            (except password hashes)

in_chroot() {
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        HOME=/root chroot "$_chroot" "$@"
}

_chroot_unmount() {
    umount "$_chroot/dev" "$_chroot/proc" 2>/dev/null || true
    : > "$_chroot/etc/resolv.conf"
}

chroot_begin() {
    _chroot=$1
    cp /etc/resolv.conf "$_chroot/etc/resolv.conf"
    mount -t proc proc "$_chroot/proc"
    mount --bind /dev "$_chroot/dev"
    trap _chroot_unmount EXIT
    trap 'exit 130' INT TERM HUP
}

apt_install() {
    in_chroot apt-get update
    in_chroot apt-get install -y --no-install-recommends "$@"
}

chroot_end() {
    in_chroot apt-get clean
    rm -rf "$_chroot"/var/lib/apt/lists/* "$_chroot"/var/cache/apt/*.bin
    _chroot_unmount
    trap - EXIT INT TERM HUP
    # ! -type l: chmod follows symlinks, and absolute ones would hit the host.
    find "$_chroot" \( -path "$_chroot/etc/shadow*" -o -path "$_chroot/etc/gshadow*" \) \
         -prune -o ! -type l -exec chmod a+rX {} +
}
