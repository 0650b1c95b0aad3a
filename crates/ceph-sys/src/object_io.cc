// Object I/O that librados' C API lacks, for src/ceph/objects.rs.
//
// - Sparse reads: a plain read of a thin object returns its holes as zeroes,
//   over the wire and into the caller's buffer. The C++ API has a sparse
//   read (the OSD answers with the allocated extents and their data only).
// - Writes of several extents of an object in one operation without copying
//   the data: the C API copies every buffer into the operation, and a copy
//   of 4 MiB is a fresh mapping of the allocator, a page fault per page.
//
// Both run on an ioctx of the C API (IoCtx::from_rados_ioctx_t shares it,
// read snapshot and write context included) and are exposed with a C ABI.
// Nothing here throws across the boundary.

#include <rados/librados.hpp>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <new>
#include <string>

namespace {

// One read in flight, then its result until the caller releases it.
struct SparseRead {
    librados::IoCtx io;
    std::map<uint64_t, uint64_t> extents;
    librados::bufferlist data;
    librados::AioCompletion* completion = nullptr;
    void (*done)(void* arg, void* read) = nullptr;
    void* arg = nullptr;

    ~SparseRead() {
        if (completion != nullptr) {
            completion->release();
        }
    }
};

void on_complete(librados::completion_t, void* p) {
    auto* r = static_cast<SparseRead*>(p);
    r->done(r->arg, r);
}

// One write operation in flight.
struct WriteExtents {
    librados::IoCtx io;
    librados::ObjectWriteOperation op;
    librados::AioCompletion* completion = nullptr;
    void (*done)(void* arg, int ret) = nullptr;
    void* arg = nullptr;

    ~WriteExtents() {
        if (completion != nullptr) {
            completion->release();
        }
    }
};

void on_write_complete(librados::completion_t, void* p) {
    auto* w = static_cast<WriteExtents*>(p);
    int ret = w->completion->get_return_value();
    auto done = w->done;
    auto arg = w->arg;
    // The caller's ioctx outlives this (it holds its own reference until
    // `done` returns), so this drops a reference, never the last one.
    delete w;
    done(arg, ret);
}

}  // namespace

extern "C" {

// Starts a sparse read of [off, off + len) of object `oid` through `io` (at
// its read snapshot). Returns 0 and later calls done(arg, read) exactly once,
// on librados' completion thread; the caller then owns `read` and must pass
// it to csirr_sparse_read_release. On a negative errno nothing was started
// and `done` is never called.
int csirr_sparse_read_start(rados_ioctx_t io, const char* oid, uint64_t off, uint64_t len,
                            void (*done)(void*, void*), void* arg) noexcept {
    SparseRead* r = nullptr;
    try {
        r = new SparseRead();
        librados::IoCtx::from_rados_ioctx_t(io, r->io);
        r->done = done;
        r->arg = arg;
        r->completion = librados::Rados::aio_create_completion(r, on_complete);
        int ret = r->io.aio_sparse_read(oid, r->completion, &r->extents, &r->data, len, off);
        if (ret < 0) {
            delete r;
            return ret;
        }
        return 0;
    } catch (const std::bad_alloc&) {
        delete r;
        return -ENOMEM;
    } catch (...) {
        delete r;
        return -EIO;
    }
}

// The result of a completed read: 0 or a negative errno (-ENOENT: no such
// object at the snapshot).
int csirr_sparse_read_result(void* read) noexcept {
    return static_cast<SparseRead*>(read)->completion->get_return_value();
}

// Number of extents a completed read returned.
size_t csirr_sparse_read_extent_count(void* read) noexcept {
    return static_cast<SparseRead*>(read)->extents.size();
}

// Writes the extents (offset in the object, length) as pairs into `out`,
// which holds 2 * csirr_sparse_read_extent_count values, in offset order.
void csirr_sparse_read_extents(void* read, uint64_t* out) noexcept {
    size_t i = 0;
    for (const auto& [off, len] : static_cast<SparseRead*>(read)->extents) {
        out[i++] = off;
        out[i++] = len;
    }
}

// The data of the extents, one after the other, in one contiguous block
// owned by the read; null on allocation failure. `len` receives its length.
const char* csirr_sparse_read_data(void* read, size_t* len) noexcept {
    auto* r = static_cast<SparseRead*>(read);
    *len = r->data.length();
    if (*len == 0) {
        return "";
    }
    try {
        return r->data.c_str();
    } catch (...) {
        return nullptr;
    }
}

// Frees a read that completed (after its `done` call).
void csirr_sparse_read_release(void* read) noexcept {
    delete static_cast<SparseRead*>(read);
}

// Starts one operation on object `oid` through `io` writing extent i of `n`
// (`lens[i]` bytes from `bufs[i]` at offset `offs[i]` in the object; zeroes
// where `bufs[i]` is null). The buffers are not copied: they must stay valid
// and unchanged until `done`. Writes carry the ioctx's snapshot context.
// Returns 0 and later calls done(arg, result) exactly once, on librados'
// completion thread, with 0 or a negative errno; on a negative errno here
// nothing was started and `done` is never called.
int csirr_write_extents_start(rados_ioctx_t io, const char* oid, size_t n, const uint64_t* offs,
                              const char* const* bufs, const size_t* lens,
                              void (*done)(void*, int), void* arg) noexcept {
    WriteExtents* w = nullptr;
    try {
        w = new WriteExtents();
        librados::IoCtx::from_rados_ioctx_t(io, w->io);
        w->done = done;
        w->arg = arg;
        for (size_t i = 0; i < n; i++) {
            if (bufs[i] == nullptr) {
                w->op.zero(offs[i], lens[i]);
                continue;
            }
            librados::bufferlist bl;
            bl.append(ceph::buffer::create_static(lens[i], const_cast<char*>(bufs[i])));
            w->op.write(offs[i], bl);
        }
        w->completion = librados::Rados::aio_create_completion(w, on_write_complete);
        int ret = w->io.aio_operate(oid, w->completion, &w->op);
        if (ret < 0) {
            delete w;
            return ret;
        }
        return 0;
    } catch (const std::bad_alloc&) {
        delete w;
        return -ENOMEM;
    } catch (...) {
        delete w;
        return -EIO;
    }
}

}  // extern "C"
