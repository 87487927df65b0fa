import ArgumentParser
import Foundation
import LogPool

struct LogPoolCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "logpool",
        abstract: "A crash-safe, log-structured, copy-on-write block pool.",
        subcommands: [Init.self, Info.self, Create.self, List.self, Snapshot.self, Clone.self, Destroy.self,
                      Rename.self, Resize.self, Write.self, Read.self, Compact.self, VerifyCommand.self, ScrubCommand.self, CrashSim.self, Torture.self, TortureChild.self,
                      Demo.self, Bench.self])
}

/// Errors are one line on stderr, `logpool: error: ...`, with a non-zero exit status:
/// 64 for a usage error, 1 for anything the pool reported.
@main
enum Main {
    static func main() {
        var err = StandardError()
        do {
            var command = try LogPoolCommand.parseAsRoot()
            try command.run()
        } catch let error as PoolError {
            print("logpool: error: \(oneLine(error.description))", to: &err)
            exit(1)
        } catch {
            let code = LogPoolCommand.exitCode(for: error)
            if code == .success { LogPoolCommand.exit(withError: error) }
            let message = LogPoolCommand.message(for: error)
                .split(separator: "\n").first.map(String.init) ?? "\(error)"
            let trimmed = message.hasPrefix("Error: ") ? String(message.dropFirst(7)) : message
            print("logpool: error: \(oneLine(trimmed))", to: &err)
            exit(code.rawValue == 0 ? 1 : code.rawValue)
        }
    }
}

/// Control characters (a name or path holding a newline) are escaped so an error stays
/// one line.
func oneLine(_ message: String) -> String {
    var result = ""
    for scalar in message.unicodeScalars {
        if scalar.properties.generalCategory == .control {
            result += "\\u{" + String(scalar.value, radix: 16) + "}"
        } else {
            result.unicodeScalars.append(scalar)
        }
    }
    return result
}
