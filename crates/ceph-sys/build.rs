//! Compiles the small C++ shim over librados' C++ API (sparse reads and
//! compound writes; Debian: libradospp-dev, g++) and links librbd and
//! librados (Debian: librbd-dev, librados-dev). `src/bindings.rs` is
//! checked-in bindgen output: no bindgen run here.

fn main() {
    // The shim first: it needs librados after it on the link line.
    println!("cargo:rerun-if-changed=src/object_io.cc");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(true)
        .extra_warnings(true)
        .file("src/object_io.cc")
        .compile("csirr_object_io");
    println!("cargo:rustc-link-lib=rbd");
    println!("cargo:rustc-link-lib=rados");
}
