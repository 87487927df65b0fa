import ArgumentParser
import LogPoolCLIKit

/// `logpool-sim`: the crash simulation and the process-kill torture. They link the
/// crash-injecting harness (LogPoolTesting), which the operator's `logpool` binary does
/// not carry.
struct SimCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "logpool-sim",
        abstract: "LogPool's crash simulation and process-kill torture.",
        version: "0.9.0",
        subcommands: [CrashSim.self, Torture.self, TortureChild.self])
}

@main
enum Main {
    static func main() { runMain(SimCommand.self, name: "logpool-sim") }
}
