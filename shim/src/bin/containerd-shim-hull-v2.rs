//! `containerd-shim-hull-v2`: containerd's shim v2 for Hull (runtime
//! `io.containerd.hull.v2`). See `hull_shim::shimv2`.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = hull_shim::shimv2::main(&args);
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
