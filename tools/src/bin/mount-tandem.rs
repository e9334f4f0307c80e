//! `mount.tandem` (built as `mount-tandem`; install it as `/sbin/mount.tandem`): mounts a
//! tandem volume on the node that may mount it. See `tandem_tools::mount`.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = tandem_tools::mount::parse(&args).and_then(|inv| tandem_tools::mount::run(&inv));
    match result {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(32)),
        Err(e) => {
            eprintln!("mount.tandem: {e:#}");
            // mount(8): 32 = mount failure.
            std::process::ExitCode::from(32)
        }
    }
}
