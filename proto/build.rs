//! Generates the SkyWalking messages and services from `proto/` with protox (a pure-Rust
//! compiler), so a fresh clone builds without a system `protoc`.

const PROTOS: &[&str] = &[
    "common/Common.proto",
    "common/Command.proto",
    "ebpf/profiling/Process.proto",
    "ebpf/profiling/Profile.proto",
    "ebpf/profiling/Continuous.proto",
    "language-agent/Meter.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    // Both sides: the agent uses the clients, the test suite's fake OAP the servers.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
