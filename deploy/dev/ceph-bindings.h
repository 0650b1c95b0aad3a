/* Headers that src/ceph/sys.rs is generated from (deploy/dev/gen-bindings.sh). */
#include <rados/librados.h>
#include <rbd/librbd.h>
