import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit

struct LogPoolCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "logpool",
        abstract: "A crash-safe, log-structured, copy-on-write block pool.",
        discussion: "Sizes take plain bytes or a number with K, M, G, T, P or E (powers of 1024; 1.5G, 1GiB and 1GB all accepted). Exit status: 0 success, 1 an error the pool reported, 64 a usage error (verify and scrub: 0 clean, 1 repaired, 4 errors left, 8 could not check).",
        version: logPoolVersion,
        subcommands: [Init.self, Info.self, Create.self, List.self, Snapshot.self, Clone.self, Destroy.self,
                      Rename.self, Resize.self, Write.self, Read.self, MapCommand.self, Export.self, Import.self, Discard.self, Serve.self, Compact.self, SyncCommand.self, VerifyCommand.self, ScrubCommand.self, Demo.self, Bench.self, BenchProbe.self])
}

/// This build's version and the pool format it reads and writes.
let logPoolVersion = "0.9.0 (pool format \(PoolGeometry.formatVersion))"

/// Errors are one line on stderr, `logpool: error: ...`, with a non-zero exit status:
/// 64 for a usage error, 1 for anything the pool reported.
@main
enum Main {
    static func main() {
        applyMetadataCacheEnvironment()
        runMain(LogPoolCommand.self, name: "logpool",
                movedCommands: ["crashsim": "logpool-sim crashsim", "torture": "logpool-sim torture"])
    }
}

/// `LOGPOOL_METADATA_CACHE` (a size, e.g. `256M`; 4K...1T) sets the metadata cache budget
/// of every pool this command opens (default 64 MiB: Pool.defaultMetadataCacheBytes). A
/// bad value is a usage error before anything is opened.
func applyMetadataCacheEnvironment() {
    guard let raw = ProcessInfo.processInfo.environment["LOGPOOL_METADATA_CACHE"] else { return }
    var err = StandardError()
    switch ByteSize.parse(raw) {
    case .success(let bytes) where bytes >= 4096 && bytes <= 1 << 40:
        Pool.overrideMetadataCacheBytes(Int(bytes))
    case .success(let bytes):
        print("logpool: error: LOGPOOL_METADATA_CACHE=\(oneLine(raw)): \(bytes) bytes is outside 4K...1T", to: &err)
        exit(64)
    case .failure(let problem):
        print("logpool: error: LOGPOOL_METADATA_CACHE=\(oneLine(raw)): \(problem.message)", to: &err)
        exit(64)
    }
}
