#!/bin/bash
# Run a command as an unprivileged user, with a clean login-like environment.
# Usage: as-user.sh USER CMD [ARG...]   (run as root)
# exec all the way down: CMD keeps this script's PID, as tests need.
# Extra variables: pass them through env, e.g. as-user.sh u env TMPDIR=/x cmd.
set -euo pipefail
user=$1; shift
home=$(getent passwd "$user" | cut -d: -f6)
[[ -n $home ]] || { echo "as-user.sh: no such user: $user" >&2; exit 1; }
# Start in the user's home: the caller's directory (a checkout under /root,
# say) may be closed to the user.
cd "$home" 2>/dev/null || cd /
exec setpriv --reuid="$user" --regid="$user" --init-groups \
    env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$user" \
        LOGNAME="$user" LANG=C.UTF-8 "$@"
