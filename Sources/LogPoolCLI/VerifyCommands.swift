import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit

#if canImport(Glibc)
import Glibc
#endif

/// `logpool verify` and `logpool scrub`: the consistency checker (Specs/VERIFY.md).
/// Exit status as fsck: 0 clean, 1 errors found and all repaired, 4 errors left,
/// 8 could not check (not a pool, I/O error, in use).
/// The arguments verify and scrub share.
struct CheckOptions: ParsableArguments {
    @Argument(help: "Path of the pool file.") var pool: String
    @Flag(help: "Rebuild derived state and commit a new checkpoint, then check again.") var repair = false
    @Flag(help: "One JSON object with the findings and counts.") var json = false
}

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check a pool's metadata without writing (exit 0 clean, 1 repaired, 4 errors left, 8 could not check).")
    @OptionGroup var options: CheckOptions

    func run() throws {
        if let served = ServedPool.current { return try verifyLive(served) }
        // A pool `logpool serve` holds is checked by the server (its live state); when no
        // server answers, the check below reports "could not check" (8) as before.
        do {
            try Pool.open(at: options.pool, mode: .readOnly).close()
        } catch PoolError.inUse(let why) {
            try? ControlClient.forward(poolPath: options.pool, refusal: why)
        } catch {
            // Reported by the check itself, with its fsck-like status.
        }
        checkAndExit(options, scrub: false)
    }

    struct LiveReport: Encodable {
        var live = true
        var errors: Int
        var problems: [String]
    }

    /// `verify` sent to `logpool serve`'s control socket: the served pool's in-memory
    /// metadata is recomputed from its trees and compared with what the engine maintains
    /// (refcounts, parent counts, per-segment bytes, dirty pages). Exit 0 clean, 4 errors.
    func verifyLive(_ pool: Pool) throws {
        guard !options.repair else {
            throw ValidationError("--repair needs the pool file to itself: stop logpool serve first")
        }
        let problems = pool.internalConsistencyProblems()
        if options.json {
            try printJSON(LiveReport(errors: problems.count, problems: problems))
        } else {
            try out("verify: \(oneLine(options.pool)): live state of the served pool: \(problems.count) errors")
            for problem in problems { try out("error: live-state: \(oneLine(problem))") }
        }
        if !problems.isEmpty { throw ExitCode(4) }
    }
}

struct ScrubCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scrub",
        abstract: "Check everything verify does and read every live data block (exit 0 clean, 1 repaired, 4 errors left, 8 could not check).")
    @OptionGroup var options: CheckOptions

    func run() throws {
        // Scrub reads every block of the file; a pool `logpool serve` holds says so.
        do {
            try Pool.open(at: options.pool, mode: .readOnly).close()
        } catch PoolError.inUse(let why) {
            do {
                try ControlClient.forward(poolPath: options.pool, refusal: why)
            } catch {
                var err = StandardError()
                print("logpool: error: could not check \(oneLine(options.pool)): \(oneLine("\(error)"))", to: &err)
                throw ExitCode(8)
            }
        } catch {
            // Reported by the check itself, with its fsck-like status.
        }
        checkAndExit(options, scrub: true)
    }
}

/// Runs the check (and repair), prints the findings and exits with the fsck-like status.
func checkAndExit(_ options: CheckOptions, scrub: Bool) -> Never {
    let (pool, repair, json) = (options.pool, options.repair, options.json)
    var err = StandardError()
    let onTerminal = isatty(CommandStreams.error) == 1 && !json
    // Runs on the scrub's reader threads, where ``CommandStreams`` does not know this
    // command's client: the descriptor is taken here, on the command's thread.
    let errorDescriptor = CommandStreams.error
    let progress: (@Sendable (ScrubProgress) -> Void)? = scrub && onTerminal ? scrubProgressPrinter(errorDescriptor) : nil
    let before: VerifyReport, after: VerifyReport
    var changes: [String] = []
    var status: Int32
    do {
        if repair {
            let result = try Pool.repair(at: pool, scrubData: scrub, progress: progress)
            (before, after, changes) = (result.before, result.after, result.changes)
            status = result.exitStatus
        } else {
            before = try Pool.verify(at: pool, scrubData: scrub, progress: progress)
            after = before
            status = before.exitStatus
        }
    } catch {
        if progress != nil { print("", to: &err) }
        print("logpool: error: could not check \(oneLine(pool)): \(oneLine("\(error)"))", to: &err)
        if json {
            struct Failure: Encodable { var pool: String; var status: Int32; var error: String }
            try? printJSON(Failure(pool: pool, status: 8, error: "\(error)"))
        }
        exit(8)
    }
    if progress != nil { print("", to: &err) }
    if json {
        struct Output: Encodable {
            var pool: String
            var status: Int32
            var report: VerifyReport
            var errorCount: Int
            var warningCount: Int
            var repaired: Bool
            var changes: [String]
            var before: VerifyReport?
        }
        let out = Output(pool: pool, status: status, report: after, errorCount: after.errorCount, warningCount: after.warningCount,
                         repaired: repair, changes: changes, before: repair ? before : nil)
        do {
            try printJSON(out)
        } catch {
            print("logpool: error: \(oneLine("\(error)"))", to: &err)
            exit(8)
        }
        exit(status)
    }
    var lines: [String] = []
    let shown = repair ? before : after
    for finding in shown.findings { lines.append(oneLine(finding.description)) }
    if repair {
        for change in changes { lines.append("repair: " + oneLine(change)) }
        for finding in after.problems { lines.append("left: " + oneLine(finding.description)) }
    }
    let what = scrub ? "scrub" : "verify"
    var summary = "\(what): \(oneLine(pool)): slot \(after.chosenSlot) generation \(after.generation), \(after.volumeCount) volumes, \(after.pageCount) pages, \(after.referencedBlockCount) blocks, \(after.replayedRecordCount) journal records replayed"
    summary += "; \(after.errorCount) errors (\(after.leakedSegmentCount) leaks, \(after.accountingErrorSegmentCount) accounting errors, \(after.damagedBlockCount) damaged blocks), \(after.warningCount) warnings"
    if repair { summary += "; before repair \(before.errorCount) errors" }
    if scrub {
        let rate = after.seconds > 0 ? Double(after.scrubbedByteCount) / after.seconds : 0
        summary += String(format: "; read %@ in %.2f s (%@/s)", formatBytes(after.scrubbedByteCount), after.seconds, formatBytes(UInt64(rate)))
    }
    lines.append(summary)
    let text = lines.joined(separator: "\n") + "\n"
    do {
        try out(text, terminator: "")
    } catch {
        print("logpool: error: \(oneLine("\(error)"))", to: &err)
        exit(8)
    }
    exit(status)
}

/// The scrub progress line, written to `descriptor`. A closed or full stderr loses the
/// line; it must not stop the scrub.
private func scrubProgressPrinter(_ descriptor: Int32) -> @Sendable (ScrubProgress) -> Void {
    { p in
        let rate = p.seconds > 0 ? Double(p.doneByteCount) / p.seconds : 0
        let eta = rate > 0 ? Double(p.totalByteCount - min(p.doneByteCount, p.totalByteCount)) / rate : 0
        let line = String(format: "\rscrub: %@ of %@, %@/s, ETA %.0f s   ", formatBytes(p.doneByteCount), formatBytes(p.totalByteCount),
                          formatBytes(UInt64(rate)), eta)
        _ = try? writeAll(Array(line.utf8), to: descriptor, what: "standard error", startingAt: 0)
    }
}
