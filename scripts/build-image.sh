#!/bin/bash
# Build a test/demo container image from its recipe and cache it outside the repo.
# Usage: build-image.sh NAME [CACHE_DIR]
#   Recipe: scripts/images/NAME.sh, run as "NAME.sh TARGET_DIR" (needs root).
#   Result: CACHE_DIR/NAME-<sha256(recipe + what it builds on)[:12]>, with
#   CACHE_DIR/NAME -> it.
#   CACHE_DIR defaults to ${CHSPAWNER_IMAGE_CACHE:-/var/cache/chspawner/images}.
# Prints one line on stdout: "image NAME: built|cached at PATH"; recipe output
# goes to stderr.  Editing a recipe (or a recipe or helper it builds on)
# changes its key, so it is rebuilt.
# Sourced ("source build-image.sh"), it only defines debian_mirror, for recipes.

# debian_mirror SUITE [APT_DIR]: the first URI of this machine's own apt
# sources (APT_DIR, default /etc/apt: sources.list, then sources.list.d's
# *.list and deb822 *.sources files in apt's order) that serves SUITE's "main"
# component, for debootstrap. The repository names no mirror: the machine's
# apt configuration is what works where the image is built (a local mirror,
# a proxy, the only network reachable). One line on stderr if there is none.
debian_mirror() {
    local suite=${1:?usage: debian_mirror SUITE [APT_DIR]} apt=${2:-/etc/apt} file uri
    for file in "$apt/sources.list" "$apt"/sources.list.d/*; do
        [[ -f $file ]] || continue
        case $file in
            *.list) uri=$(awk -v suite="$suite" '
                { sub(/#.*/, ""); gsub(/\[[^]]*\]/, " ") }   # comments, [options]
                $1 == "deb" && $3 == suite && $2 ~ /^(https?|file):/ {
                    for (i = 4; i <= NF; i++) if ($i == "main") { print $2; exit }
                }' "$file") ;;
            *.sources) uri=$(awk -v suite="$suite" '
                function has(list, word,   n, w, i) {
                    n = split(list, w, /[ \t]+/)
                    for (i = 1; i <= n; i++) if (w[i] == word) return 1
                    return 0
                }
                BEGIN { RS = ""; FS = "\n" }   # one stanza a record, one line a field
                {
                    split("", f); name = ""
                    for (i = 1; i <= NF; i++) {
                        if ($i ~ /^#/) continue
                        if ($i ~ /^[ \t]/) { if (name != "") f[name] = f[name] " " $i; continue }
                        if (!(p = index($i, ":"))) continue
                        name = tolower(substr($i, 1, p - 1)); f[name] = substr($i, p + 1)
                    }
                    if (has(f["enabled"], "no") || !has(f["types"], "deb") ||
                        !has(f["suites"], suite) || !has(f["components"], "main")) next
                    n = split(f["uris"], u, /[ \t]+/)
                    for (i = 1; i <= n; i++) if (u[i] ~ /^(https?|file):/) { print u[i]; exit }
                }' "$file") ;;
            *) continue ;;
        esac
        if [[ -n $uri ]]; then echo "$uri"; return 0; fi
    done
    echo "debian_mirror: no Debian \"$suite\" source with component main in $apt/sources.list" \
         "or $apt/sources.list.d/ (debootstrap takes its mirror from there)" >&2
    return 1
}
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

set -euo pipefail
umask 022   # new CACHE_DIR (and parents) and image files: 0755 / world-readable
die() { echo "build-image.sh: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: build-image.sh NAME [CACHE_DIR]"
name=$1
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "bad image name: $name"
recipe=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/images/$name.sh
[[ -f $recipe ]] || die "no recipe for image $name: $recipe"
cache=${2:-${CHSPAWNER_IMAGE_CACHE:-/var/cache/chspawner/images}}
mkdir -p "$cache" || die "cannot create cache directory $cache"
cache=$(cd "$cache" && pwd)

# The key covers the recipe and what it builds on: the recipes and helpers
# it runs or sources as "$here/FILE.sh" (scripts/images/FILE.sh). A recipe
# on its own keys as sha256sum of its file.
sources=("$recipe")
for dep in $(grep -o '\$here/[A-Za-z0-9_/.-]*\.sh' "$recipe" | sed 's|^\$here/||' | sort -u); do
    [[ -f $(dirname "$recipe")/$dep ]] || die "recipe $recipe builds on missing $dep"
    sources+=("$(dirname "$recipe")/$dep")
done
hash=$(cat "${sources[@]}" | sha256sum | cut -c1-12)
dest=$cache/$name-$hash

# Point CACHE_DIR/NAME at the current version (atomically) and drop old ones.
finish() {
    local lnk old
    lnk=$(mktemp -u "$cache/.$name.lnk.XXXXXX")
    ln -sfn "$name-$hash" "$lnk"   # relative, so the cache can be moved
    mv -Tf "$lnk" "$cache/$name"
    # Exactly NAME-<12 hex>, so e.g. "busybox-musl-*" images are left alone.
    for old in "$cache/$name"-$(printf '[0-9a-f]%.0s' {1..12}); do
        [[ -d $old && ! -L $old && $old != "$dest" ]] || continue
        rm -rf --one-file-system "$old"
    done
    echo "image $name: $1 at $dest"
}

if [[ -d $dest ]]; then finish cached; exit 0; fi

tmp=$(mktemp -d "$cache/.$name-$hash.tmp.XXXX")
# --one-file-system: never descend into something a failed recipe left mounted.
trap 'rm -rf --one-file-system "$tmp"' EXIT
trap 'exit 130' INT TERM HUP   # so the EXIT trap also runs when interrupted
chmod 0755 "$tmp"
echo "build-image.sh: building $name from $recipe" >&2
start=$SECONDS
bash "$recipe" "$tmp" >&2 || die "recipe $recipe failed (exit $?)"
# mv -T refuses to move into an existing directory: if a concurrent build won
# the race, keep its result and discard ours.
if ! mv -T "$tmp" "$dest" 2>/dev/null; then
    [[ -d $dest ]] || die "cannot move $tmp to $dest"
fi
echo "build-image.sh: built $name in $((SECONDS - start))s" >&2
finish built
