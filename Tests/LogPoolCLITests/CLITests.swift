import Foundation
import Testing

/// Runs the built `logpool` binary (swift test builds it beside the test bundle).
struct CLI {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let binary = root.appendingPathComponent(".build/debug/logpool").path
    /// `logpool-sim`: crashsim and torture.
    static let simBinary = root.appendingPathComponent(".build/debug/logpool-sim").path

    struct Result {
        var status: Int32
        var stdout: Data
        var stderr: String
        var text: String { String(decoding: stdout, as: UTF8.self) }
    }

    @discardableResult
    static func run(_ arguments: [String], stdin: Data? = nil, binary: String = CLI.binary, directory: String? = nil,
                    environment: [String: String] = [:]) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
        let out = Pipe(), err = Pipe(), input = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = input
        // A command may stop reading its input early (a refused write): the test process
        // must then see EPIPE, not die of SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
        try process.run()
        // Input is fed from another thread, so a command that writes much before it
        // reads cannot deadlock against us.
        let writer = input.fileHandleForWriting
        let feeding = DispatchGroup()
        DispatchQueue.global().async(group: feeding) {
            if let stdin { try? writer.write(contentsOf: stdin) }
            try? writer.close()
        }
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        feeding.wait()
        return Result(status: process.terminationStatus, stdout: stdout, stderr: String(decoding: stderr, as: UTF8.self))
    }
}

func temporaryPath(_ name: String) -> String {
    let dir = NSTemporaryDirectory() + "logpool-cli-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir + "/" + name
}

@Suite("logpool CLI")
struct CLITests {
    @Test("LOGPOOL_METADATA_CACHE: a one-page cache reads back what was written; a bad value is a usage error")
    func metadataCacheEnvironment() throws {
        let pool = temporaryPath("p.pool"), raw = temporaryPath("in.raw"), out = temporaryPath("out.raw")
        let tiny = ["LOGPOOL_METADATA_CACHE": "4K"]
        // 1 MiB of 512-byte blocks: 2048 block ids over 13 block-table leaves.
        var bytes = [UInt8](repeating: 0, count: 1 << 20)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 2654435761 >> 7) | 1 }
        try Data(bytes).write(to: URL(fileURLWithPath: raw))
        #expect(try CLI.run(["init", pool, "--size", "16M", "--block-size", "512", "--compression", "none"], environment: tiny).status == 0)
        let imported = try CLI.run(["import", pool, raw, "v"], environment: tiny)
        #expect(imported.status == 0, "\(imported.stderr)")
        let exported = try CLI.run(["export", pool, "v", out], environment: tiny)
        #expect(exported.status == 0, "\(exported.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: out)) == Data(bytes))
        #expect(try CLI.run(["verify", pool], environment: tiny).status == 0)
        for bad in ["lots", "1K", "-5M", ""] {
            let result = try CLI.run(["list", pool], environment: ["LOGPOOL_METADATA_CACHE": bad])
            #expect(result.status == 64 && result.stderr.hasPrefix("logpool: error: LOGPOOL_METADATA_CACHE="),
                    "LOGPOOL_METADATA_CACHE=\(bad): status \(result.status), \(result.stderr)")
        }
    }

    @Test("the documented workflow: init, create, write, snapshot, clone, read, list, info, resize, rename, destroy, compact")
    func workflow() throws {
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "64M", "--compression", "lz4"]).status == 0)
        #expect(try CLI.run(["create", pool, "disk", "--size", "8M"]).status == 0)
        let payload = Data((0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) })
        let wrote = try CLI.run(["write", pool, "disk", "--offset", "4K"], stdin: payload)
        #expect(wrote.status == 0, "\(wrote.stderr)")
        #expect(try CLI.run(["snapshot", pool, "disk", "disk@1"]).status == 0)
        #expect(try CLI.run(["write", pool, "disk", "--offset", "4096"], stdin: Data(repeating: 0xEE, count: 5000)).status == 0)
        #expect(try CLI.run(["clone", pool, "disk@1", "dev"]).status == 0)
        let snap = try CLI.run(["read", pool, "disk@1", "--offset", "4096", "--length", "\(payload.count)"])
        #expect(snap.status == 0)
        #expect(snap.stdout == payload)
        let disk = try CLI.run(["read", pool, "disk", "--offset", "4096", "--length", "5000"])
        #expect(disk.stdout == Data(repeating: 0xEE, count: 5000))
        let whole = try CLI.run(["read", pool, "dev"])
        #expect(whole.stdout.count == 8 << 20)

        let list = try CLI.run(["list", pool, "--json"])
        #expect(list.status == 0)
        let rows = try #require(try JSONSerialization.jsonObject(with: list.stdout) as? [[String: Any]])
        let byName = Dictionary(uniqueKeysWithValues: rows.map { ($0["name"] as! String, $0) })
        #expect(byName["disk@1"]?["kind"] as? String == "snapshot")
        #expect(byName["dev"]?["origin"] as? String == "disk@1")
        #expect(byName["disk"]?["origin"] is NSNull)
        #expect((byName["disk"]?["sizeBytes"] as? Int) == 8 << 20)
        for key in ["allocatedBytes", "exclusiveBytes"] { #expect(byName["disk"]?[key] is Int) }

        let info = try CLI.run(["info", pool, "--json"])
        let object = try #require(try JSONSerialization.jsonObject(with: info.stdout) as? [String: Any])
        for key in ["capacityBytes", "usedBytes", "freeBytes", "deadBytes", "reserveBytes", "volumeCount", "blockSize", "segmentSize"] {
            #expect(object[key] is Int, "info --json lacks \(key)")
        }
        #expect(object["compression"] as? String == "lz4")
        #expect(object["cleanlyClosed"] as? Bool == true)
        #expect(object["capacityBytes"] as? Int == 64 << 20)

        #expect(try CLI.run(["resize", pool, "dev", "--size", "16M"]).status == 0)
        #expect(try CLI.run(["rename", pool, "dev", "dev2"]).status == 0)
        #expect(try CLI.run(["destroy", pool, "disk@1"]).status == 0)
        let compact = try CLI.run(["compact", pool])
        #expect(compact.status == 0)
        #expect(compact.text.contains("compacted"))
        let after = try CLI.run(["list", pool])
        #expect(after.text.contains("dev2") && !after.text.contains("disk@1"))
    }

    @Test("errors are one line 'logpool: error: ...' with a non-zero status")
    func errors() throws {
        let pool = temporaryPath("e.pool")
        try CLI.run(["init", pool, "--size", "16M"])
        let cases: [([String], String)] = [
            (["init", pool, "--size", "16M"], "already exists"),
            (["init", temporaryPath("x.pool"), "--size", "12Q"], "--size"),
            (["init", temporaryPath("x.pool"), "--size", "-5"], "negative size"),
            (["init", temporaryPath("y.pool"), "--size", "1M"], "too small"),
            (["create", pool, "v", "--size", "abc"], "--size"),
            (["create", pool, "", "--size", "1M"], "empty"),
            (["read", pool, "missing"], "not found"),
            (["snapshot", pool, "nope", "s"], "not found"),
            (["info", temporaryPath("absent.pool")], "not found"),
        ]
        for (arguments, fragment) in cases {
            let result = try CLI.run(arguments)
            #expect(result.status != 0, "\(arguments)")
            let lines = result.stderr.split(separator: "\n")
            #expect(lines.count == 1, "\(arguments): \(result.stderr)")
            #expect(result.stderr.hasPrefix("logpool: error: "), "\(arguments): \(result.stderr)")
            #expect(result.stderr.contains(fragment), "\(arguments): \(result.stderr)")
        }
        try CLI.run(["create", pool, "v", "--size", "1M"])
        try CLI.run(["snapshot", pool, "v", "s"])
        let readOnly = try CLI.run(["write", pool, "s"], stdin: Data([1, 2, 3]))
        #expect(readOnly.status != 0 && readOnly.stderr.contains("read-only"))
        let range = try CLI.run(["write", pool, "v", "--offset", "1M"], stdin: Data([1]))
        #expect(range.status != 0 && range.stderr.contains("out of range"))
    }

    @Test("a refused command leaves the pool unchanged and cleanly closed")
    func refusedCommandsChangeNothing() throws {
        let pool = temporaryPath("r.pool")
        try CLI.run(["init", pool, "--size", "16M"])
        try CLI.run(["create", pool, "v", "--size", "64K"])
        let before = try JSONSerialization.jsonObject(with: try CLI.run(["info", pool, "--json"]).stdout) as? [String: Any]
        // Too much input for the volume: refused before anything is written.
        let big = temporaryPath("big.bin")
        try Data(repeating: 7, count: 100_000).write(to: URL(fileURLWithPath: big))
        let write = try CLI.run(["write", pool, "v", "--input", big])
        #expect(write.status != 0 && write.stderr.contains("out of range"), "\(write.stderr)")
        #expect(try CLI.run(["read", pool, "v", "--length", "4"]).stdout == Data(count: 4))
        #expect(try CLI.run(["snapshot", pool, "nope", "s"]).status != 0)
        #expect(try CLI.run(["create", pool, "a/b", "--size", "4K"]).status != 0)
        // A read past the end creates no output file.
        let out = temporaryPath("out.bin")
        #expect(try CLI.run(["read", pool, "v", "--length", "1M", "--output", out]).status != 0)
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(try CLI.run(["read", pool, "v", "--output", pool]).stderr.contains("pool file itself"))
        let after = try JSONSerialization.jsonObject(with: try CLI.run(["info", pool, "--json"]).stdout) as? [String: Any]
        #expect(after?["cleanlyClosed"] as? Bool == true)
        #expect(after?["usedBytes"] as? Int == before?["usedBytes"] as? Int)
        // A name with a newline still gives a one-line error.
        let odd = try CLI.run(["read", pool, "a\nb"])
        #expect(odd.status != 0 && odd.stderr.split(separator: "\n").count == 1, "\(odd.stderr)")
    }

    @Test("info on files that are not pools says what is wrong")
    func notPools() throws {
        let text = temporaryPath("text.txt")
        try Data(String(repeating: "hello\n", count: 2000).utf8).write(to: URL(fileURLWithPath: text))
        let result = try CLI.run(["info", text])
        #expect(result.status != 0)
        #expect(result.stderr.contains("bad magic"), "\(result.stderr)")
        let zeroLength = temporaryPath("zero-length.pool")
        FileManager.default.createFile(atPath: zeroLength, contents: Data())
        let emptyResult = try CLI.run(["info", zeroLength])
        #expect(emptyResult.status != 0)
        #expect(emptyResult.stderr.contains("file is empty"), "\(emptyResult.stderr)")
        let pool = temporaryPath("t.pool")
        try CLI.run(["init", pool, "--size", "16M"])
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: pool))
        try handle.truncate(atOffset: 1 << 20)
        try handle.close()
        let truncated = try CLI.run(["info", pool])
        #expect(truncated.status != 0 && truncated.stderr.contains("truncated"), "\(truncated.stderr)")
    }

    /// Goal: verify and scrub follow fsck's exit statuses (0 clean, 1 repaired, 4 errors
    /// left, 8 could not check) and print one line per finding plus a summary.
    @Test("verify and scrub: exit 0 clean, 4 damaged, 1 after --repair, 8 when they cannot check")
    func verifyAndScrub() throws {
        let pool = temporaryPath("v.pool")
        #expect(try CLI.run(["init", pool, "--size", "16M", "--compression", "none"]).status == 0)
        #expect(try CLI.run(["create", pool, "disk", "--size", "1M"]).status == 0)
        #expect(try CLI.run(["write", pool, "disk"], stdin: Data((0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 13) })).status == 0)
        let clean = try CLI.run(["verify", pool])
        #expect(clean.status == 0 && clean.text.contains("verify: ") && clean.text.contains("0 errors"), "\(clean.text)\(clean.stderr)")
        let scrub = try CLI.run(["scrub", pool, "--json"])
        #expect(scrub.status == 0)
        let object = try JSONSerialization.jsonObject(with: scrub.stdout) as? [String: Any]
        let report = object?["report"] as? [String: Any]
        #expect(object?["status"] as? Int == 0 && object?["errorCount"] as? Int == 0)
        #expect((report?["scrubbedByteCount"] as? Int ?? 0) >= 100_000 && report?["findings"] is [Any])

        // Damage the older superblock slot (A after an even number of commits or B).
        let handle = try #require(FileHandle(forUpdatingAtPath: pool))
        let chosen = (report?["chosenSlot"] as? String) == "A" ? 0 : 1
        let other = UInt64(4096 * (1 - chosen))
        try handle.seek(toOffset: other + 64)
        try handle.write(contentsOf: Data([0xFF, 0x00, 0xFF]))
        try handle.close()
        let damaged = try CLI.run(["verify", pool])
        #expect(damaged.status == 4 && damaged.text.contains("superblock-damaged"), "\(damaged.text)")
        let repaired = try CLI.run(["verify", pool, "--repair"])
        #expect(repaired.status == 1 && repaired.text.contains("repair: fixed: superblock-damaged"), "\(repaired.text)")
        #expect(try CLI.run(["verify", pool]).status == 0)

        // A writer holds the pool (an exclusive flock, as Pool.open takes): exit 8.
        let holder = open(pool, O_RDWR)
        #expect(holder >= 0 && flock(holder, LOCK_EX | LOCK_NB) == 0)
        let busy = try CLI.run(["verify", pool, "--json"])
        #expect(busy.status == 8 && busy.stderr.contains("in use"), "\(busy.stderr)")
        let busyObject = try JSONSerialization.jsonObject(with: busy.stdout) as? [String: Any]
        #expect(busyObject?["status"] as? Int == 8)
        close(holder)

        let notPool = temporaryPath("not.pool")
        FileManager.default.createFile(atPath: notPool, contents: Data(repeating: 7, count: 100_000))
        let refused = try CLI.run(["verify", notPool])
        #expect(refused.status == 8 && refused.stderr.hasPrefix("logpool: error: could not check"), "\(refused.stderr)")
        #expect(try CLI.run(["scrub", temporaryPath("missing.pool")]).status == 8)
    }

    /// Goal: crashsim runs, reports its figures as JSON, and replays a state by id.
    @Test("crashsim: a short run reports figures and a state replays by id")
    func crashsim() throws {
        let run = try CLI.run(["crashsim", "--budget", "1", "--ops", "8", "--json"], binary: CLI.simBinary)
        #expect(run.status == 0, "\(run.stderr)")
        let object = try JSONSerialization.jsonObject(with: run.stdout) as? [String: Any]
        let figures = object?["figures"] as? [String: Any]
        #expect((object?["workloads"] as? Int ?? 0) >= 1 && (figures?["crashPoints"] as? Int ?? 0) >= 1, "\(run.text)")
        let directory = temporaryPath("replay")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: CLI.simBinary)
        process.arguments = ["crashsim", "--replay", "v1:3:random-512:7:prefix:0"]
        process.currentDirectoryURL = URL(fileURLWithPath: directory)
        process.standardOutput = Pipe()
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        #expect(FileManager.default.fileExists(atPath: directory + "/crashsim-3-7-prefix-0.img"))
        let bad = try CLI.run(["crashsim", "--replay", "v1:3:nonsense"], binary: CLI.simBinary)
        #expect(bad.status != 0 && bad.stderr.hasPrefix("logpool-sim: error:"), "\(bad.stderr)")
        // A C9 id (short write, then ENOSPC, at the 5th write) replays too.
        let fault = try CLI.run(["crashsim", "--replay", "v1:3:random-512:5:write-err:1"], binary: CLI.simBinary)
        #expect(fault.status == 0 && fault.text.contains("all invariants hold"), "\(fault.text)")
    }

    /// Goal: torture kills its child and checks every recovery; figures as JSON.
    @Test("torture: children killed with SIGKILL, every recovery checked")
    func torture() throws {
        let run = try CLI.run(["torture", "--seconds", "2", "--dir", temporaryPath(""), "--json"], binary: CLI.simBinary)
        #expect(run.status == 0, "\(run.text)")
        let object = try JSONSerialization.jsonObject(with: run.stdout) as? [String: Any]
        #expect((object?["iterations"] as? Int ?? 0) >= 2 && (object?["violations"] as? [Any])?.isEmpty == true, "\(run.text)")
        #expect((object?["opsStarted"] as? Int ?? 0) > 0, "\(run.text)")
    }
}
