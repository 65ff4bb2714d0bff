fn main() -> std::process::ExitCode {
    rover_agent::cli::main()
}
