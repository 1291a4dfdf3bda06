#!/bin/bash
# Build a test/demo container image from its recipe and cache it outside the repo.
# Usage: build-image.sh NAME [CACHE_DIR]
#   Recipe: scripts/images/NAME.sh, run as "NAME.sh TARGET_DIR" (needs root).
#   Result: CACHE_DIR/NAME-<sha256(recipe)[:12]>, with CACHE_DIR/NAME -> it.
#   CACHE_DIR defaults to ${CHSPAWNER_IMAGE_CACHE:-/var/cache/chspawner/images}.
# Prints one line on stdout: "image NAME: built|cached at PATH"; recipe output
# goes to stderr.  Editing a recipe changes its key, so it is rebuilt.
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

hash=$(sha256sum "$recipe" | cut -c1-12)
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
