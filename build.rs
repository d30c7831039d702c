// Compiles our views of Milvus messages (proto/views.proto, proto/sync.proto). protoc comes from the
// protoc-bin-vendored crate so a fresh machine needs no system package.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/views.proto");
    println!("cargo:rerun-if-changed=proto/sync.proto");
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    prost_build::Config::new().compile_protos(&["proto/views.proto"], &["proto"])?;
    // sync.proto uses views.proto's shared messages, which live in crate::milvus::views.
    // (An extern path is not generated, hence the separate run above.)
    prost_build::Config::new()
        .extern_path(".milvus_sidecar.views", "crate::milvus::views")
        .compile_protos(&["proto/sync.proto"], &["proto"])?;
    Ok(())
}
