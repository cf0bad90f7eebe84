#!/bin/sh
# Runs CMD where libibverbs, librdmacm, libhwloc, libudev and libnl cannot be loaded, as on a node
# without rdma-core: /dev/null is bind-mounted over every file of those libraries (symlinks point
# at them). Only inside a private mount namespace, which needs root:
#   unshare -m scripts/hide-rdma-libs.sh CMD [ARGS...]
# Used by tests/no_rdma_libs.rs and scripts/test-wheel.sh.
set -e
for f in /lib*/*/lib* /usr/lib*/*/lib* /lib64/lib* /usr/lib64/lib*; do
    case "${f##*/}" in
        libibverbs.so*|librdmacm.so*|libhwloc.so*|libudev.so*|libnl-3.so*|libnl-route-3.so*)
            if [ -f "$f" ] && [ ! -L "$f" ]; then mount --bind /dev/null "$f"; fi ;;
    esac
done
exec "$@"
