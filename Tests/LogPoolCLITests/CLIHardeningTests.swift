import Foundation
import LogPool
import LogPoolTesting
import Testing

/// Runs `script` under /bin/sh with `$LOGPOOL` set to the built binary: for what a
/// Process cannot arrange directly (a closed descriptor, /dev/full, a FIFO, a terminal).
func shell(_ script: String) throws -> CLI.Result {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/sh")
    process.arguments = ["-c", script]
    var environment = ProcessInfo.processInfo.environment
    environment["LOGPOOL"] = CLI.binary
    process.environment = environment
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return CLI.Result(status: process.terminationStatus, stdout: stdout, stderr: String(decoding: stderr, as: UTF8.self))
}

/// A single-quoted shell word.
func quoted(_ text: String) -> String { "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'" }

func randomBytes(_ count: Int, seed: UInt64) -> Data {
    var generator = SeededGenerator(seed: seed)
    return Data((0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) })
}

/// The CLI half of the hardening issue, checked as a user would run the commands.
@Suite("logpool CLI hardening")
struct CLIHardeningTests {
    /// Goal (item 4): `write` with standard input closed (cron, daemons) is refused and
    /// leaves the volume as it was; before, the pool file landed on descriptor 0 and its
    /// own bytes were copied into the volume.
    @Test("write with stdin closed is refused and does not copy the pool file into the volume")
    func closedStdinWriteRefused() throws {
        let pool = temporaryPath("stdin.pool")
        try CLI.run(["init", pool, "--size", "16M"])
        try CLI.run(["create", pool, "v", "--size", "1M"])
        let payload = randomBytes(8192, seed: 4)
        #expect(try CLI.run(["write", pool, "v"], stdin: payload).status == 0)
        let itself = try shell("\"$LOGPOOL\" write \(quoted(pool)) v < \(quoted(pool))")
        #expect(itself.status == 1 && itself.stderr.contains("pool file itself"), "\(itself.stderr)")
        let devNull = try CLI.run(["read", pool, "v", "--output", "/dev/null"])
        #expect(devNull.status == 0, "read --output /dev/null: \(devNull.stderr)")
        let result = try shell("\"$LOGPOOL\" write \(quoted(pool)) v <&-")
        #expect(result.status == 64 && result.stderr.contains("standard input is closed"), "\(result.stderr)")
        #expect(try CLI.run(["read", pool, "v", "--length", "8192"]).stdout == payload)
        // A read-only command with every standard stream closed still works.
        #expect(try shell("\"$LOGPOOL\" info \(quoted(pool)) <&- 2>&-").status == 0)
    }

    /// Goal (item 6): a regular input file that cannot fit is refused before anything
    /// is written; a stream that fills the pool part-way says exactly how many bytes
    /// were written and synced, and they read back.
    @Test("write --input refuses a file that cannot fit whole; a stream reports the bytes written and synced")
    func writeOnFullPoolIsWholeOrExact() throws {
        let pool = temporaryPath("full.pool")
        #expect(try CLI.run(["init", pool, "--size", "8M", "--compression", "none"]).status == 0)
        try CLI.run(["create", pool, "v", "--size", "64M"])
        let input = temporaryPath("ten.bin")
        let payload = randomBytes(10 << 20, seed: 6)
        try payload.write(to: URL(fileURLWithPath: input))
        let refused = try CLI.run(["write", pool, "v", "--input", input])
        #expect(refused.status == 1 && refused.stderr.contains("pool full"), "\(refused.stderr)")
        let rows = try JSONSerialization.jsonObject(with: try CLI.run(["list", pool, "--json"]).stdout) as? [[String: Any]]
        #expect(rows?.first?["mappedBytes"] as? Int == 0, "nothing may be written: \(String(describing: rows))")

        // Standard input redirected from the same regular file is admitted whole too.
        let redirected = try shell("\"$LOGPOOL\" write \(quoted(pool)) v < \(quoted(input))")
        #expect(redirected.status == 1 && redirected.stderr.contains("pool full") && !redirected.stderr.contains("synced"), "\(redirected.stderr)")
        let streamed = try CLI.run(["write", pool, "v"], stdin: payload)
        #expect(streamed.status == 1, "\(streamed.stderr)")
        let pattern = try NSRegularExpression(pattern: "the ([0-9]+) bytes before it were written and synced \\(v bytes 0 to ([0-9]+)\\)")
        let text = streamed.stderr
        let match = try #require(pattern.firstMatch(in: text, range: NSRange(text.startIndex..., in: text)), "\(text)")
        let count = Int((text as NSString).substring(with: match.range(at: 1)))!
        #expect(count > 0 && count < payload.count && count % (1 << 20) == 0)
        #expect(try CLI.run(["read", pool, "v", "--length", "\(count)"]).stdout == payload.prefix(count))
        #expect(try CLI.run(["verify", pool]).status == 0)
    }

    /// Goal (item 7): a FIFO (or a directory) as the pool path is refused at once with
    /// a clear error; before, `open` blocked forever.
    @Test("a FIFO or a directory as the pool path is refused without blocking")
    func fifoPoolPathRefused() throws {
        let fifo = temporaryPath("ff")
        #expect(mkfifo(fifo, 0o600) == 0)
        for command in ["info", "list", "verify", "compact", "read"] {
            let extra = command == "read" ? " v" : ""
            let result = try shell("timeout 20 \"$LOGPOOL\" \(command) \(quoted(fifo))\(extra) > /dev/null")
            #expect(result.status != 124, "\(command) blocked on a FIFO")
            #expect(result.status != 0 && result.stderr.contains("FIFO"), "\(command): \(result.stderr)")
        }
        let directory = try shell("\"$LOGPOOL\" info \(quoted(NSTemporaryDirectory()))")
        #expect(directory.status == 1 && directory.stderr.contains("directory"), "\(directory.stderr)")
    }

    /// Goal (item 8): every command checks its output: stdout on /dev/full is one error
    /// line with the real errno (28) and a non-zero exit, never exit 0 or errno 640.
    @Test("stdout on /dev/full: one error line with errno 28 and a non-zero exit, for every command")
    func outputFailuresReported() throws {
        guard FileManager.default.fileExists(atPath: "/dev/full") else {
            print("skipped: /dev/full is missing on this machine")
            return
        }
        let pool = temporaryPath("out.pool")
        try CLI.run(["init", pool, "--size", "16M"])
        try CLI.run(["create", pool, "v", "--size", "1M"])
        try CLI.run(["write", pool, "v"], stdin: Data(repeating: 5, count: 5000))
        let commands = [
            "info \(quoted(pool))", "info \(quoted(pool)) --json", "list \(quoted(pool))", "list \(quoted(pool)) --json",
            "compact \(quoted(pool))", "init \(quoted(temporaryPath("new.pool"))) --size 8M", "verify \(quoted(pool))",
            "verify \(quoted(pool)) --json", "read \(quoted(pool)) v", "read \(quoted(pool)) v --output -",
            "--version", "demo",
        ]
        for command in commands {
            let result = try shell("\"$LOGPOOL\" \(command) > /dev/full")
            #expect(result.status != 0, "\(command) exited 0 with its output lost")
            let lines = result.stderr.split(separator: "\n")
            #expect(lines.count == 1 && result.stderr.contains("(errno 28)"), "\(command): \(result.stderr)")
            #expect(!result.stderr.contains("640"), "\(command): \(result.stderr)")
        }
    }

    /// Goal (item 1, CLI): `read`, `list` and `info` of a pool whose synced journal is
    /// damaged fail with `corrupt` naming the journal and what is lost; `--salvage`
    /// reads what precedes the damage and prints the loss; verify keeps reporting it.
    @Test("synced journal damage: read, list and info fail; --salvage reads and names the loss")
    func syncedJournalDamageCLI() throws {
        let image = try DamagedImages.syncedJournalDamage().damaged
        let path = temporaryPath("damaged.pool")
        try Data(image).write(to: URL(fileURLWithPath: path))
        for arguments in [["read", path, "v", "--length", "4096"], ["list", path], ["info", path], ["info", path, "--json"]] {
            let result = try CLI.run(arguments)
            #expect(result.status == 1 && result.stderr.contains("corrupt journal record") && result.stderr.contains("lost"),
                    "\(arguments): \(result.stderr)")
            #expect(result.stdout.isEmpty)
        }
        let salvaged = try CLI.run(["list", path, "--salvage"])
        #expect(salvaged.status == 0 && salvaged.text.contains("v"), "\(salvaged.stderr)")
        #expect(salvaged.stderr.contains("warning: salvaging") && salvaged.stderr.contains("cannot be replayed"), "\(salvaged.stderr)")
        #expect(try CLI.run(["read", path, "v", "--length", "4096", "--salvage"]).status == 0)
        let verify = try CLI.run(["verify", path])
        #expect(verify.status == 4 && verify.text.contains("journal-synced-damage"), "\(verify.text)")
    }

    /// Format 2 (issue 11): every command on a format-1 pool says it was created by an
    /// older LogPool, exits non-zero and leaves the file as it was.
    @Test("a format-1 pool: every command names the older format and changes nothing")
    func olderFormatCLI() throws {
        let path = temporaryPath("v1.pool")
        try CLI.run(["init", path, "--size", "16M"])
        var image = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        for base in [0, 4096] {
            image[base + SuperblockLayout.formatVersionOffset] = 1
            let sum = Checksum.xxh3(Array(image[base..<base + SuperblockLayout.checksumOffset]))
            withUnsafeBytes(of: sum.littleEndian) { image.replaceSubrange(base + SuperblockLayout.checksumOffset..<base + 512, with: $0) }
        }
        try Data(image).write(to: URL(fileURLWithPath: path))
        for arguments in [["info", path], ["list", path], ["create", path, "v", "--size", "1M"], ["verify", path], ["verify", path, "--repair"]] {
            let result = try CLI.run(arguments)
            #expect(result.status != 0 && result.stderr.contains("created by an older LogPool: pool format version 1"),
                    "\(arguments): status \(result.status), \(result.stderr)\(result.text)")
        }
        #expect([UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) == image)
    }

    @Test("help shows real defaults, every argument has help, --version works, help of an unknown command is a usage error")
    func helpAndVersion() throws {
        let initHelp = try CLI.run(["init", "--help"]).text
        #expect(initHelp.contains("default: 4K") && initHelp.contains("default: lz4") && initHelp.contains("64K to 256M"), "\(initHelp)")
        #expect(!initHelp.contains("ByteSize(") && !initHelp.contains("default: 1)"), "\(initHelp)")
        for command in ["create", "snapshot", "clone", "destroy", "rename", "resize", "write", "read", "info", "list", "compact"] {
            let help = try CLI.run([command, "--help"]).text
            let arguments = help.components(separatedBy: "ARGUMENTS:").dropFirst().first?.components(separatedBy: "OPTIONS:").first ?? ""
            for line in arguments.split(separator: "\n") where line.trimmingCharacters(in: .whitespaces).hasPrefix("<") {
                #expect(line.trimmingCharacters(in: .whitespaces).contains(" "), "\(command): argument without help: \(line)")
            }
        }
        let version = try CLI.run(["--version"])
        #expect(version.status == 0 && version.text.contains("pool format 4"))
        let unknown = try CLI.run(["help", "nosuch"])
        #expect(unknown.status == 64 && unknown.stderr.contains("no such command"), "\(unknown.stderr)")
        let simUsage = try CLI.run(["crashsim", "--budget", "-1"], binary: CLI.simBinary)
        #expect(simUsage.status == 64, "\(simUsage.stderr)")
        let benchUsage = try CLI.run(["bench", "--gib", "0"])
        #expect(benchUsage.status == 64, "\(benchUsage.stderr)")
        #expect(try CLI.run(["crashsim", "--help"]).status == 64, "crashsim belongs to logpool-sim")
    }

    static let sizeCases: [(String, Int)] = [
        ("1.5G", 1_610_612_736), ("1GiB", 1 << 30), ("1GB", 1 << 30), ("1g", 1 << 30), ("64m", 64 << 20),
        ("32768K", 32 << 20), ("33554432", 32 << 20), ("0.5G", 512 << 20),
    ]

    @Test("sizes as qemu-img, LVM and zfs users type them", arguments: sizeCases)
    func sizes(text: String, bytes: Int) throws {
        let pool = temporaryPath("size.pool")
        let result = try CLI.run(["init", pool, "--size", text, "--segment-size", "1M"])
        #expect(result.status == 0, "\(text): \(result.stderr)")
        let info = try JSONSerialization.jsonObject(with: try CLI.run(["info", pool, "--json"]).stdout) as? [String: Any]
        #expect(info?["capacityBytes"] as? Int == bytes, "\(text)")
        for bad in ["-5", "1.3K", "1.5", "2P", "abc", "1.5.5G", "9999999999E"] {
            let refused = try CLI.run(["create", pool, "x", "--size", bad])
            #expect(refused.status != 0, "\(bad) accepted")
        }
        #expect(try CLI.run(["create", pool, "x", "--size", "-5"]).stderr.contains("negative size"))
        #expect(try CLI.run(["create", pool, "x", "--size", "2P"]).stderr.contains("exceeds"))
    }

    @Test("names: invalid UTF-8 arguments and invisible characters are refused")
    func names() throws {
        let pool = temporaryPath("names.pool")
        try CLI.run(["init", pool, "--size", "16M"])
        let invalid = try shell("\"$LOGPOOL\" create \(quoted(pool)) \"$(printf 'a\\377')\" --size 4K")
        #expect(invalid.status == 64 && invalid.stderr.contains("not valid UTF-8"), "\(invalid.stderr)")
        for name in [".", "..", "a\u{2028}b", "zero\u{200B}width"] {
            let result = try CLI.run(["create", pool, name, "--size", "4K"])
            #expect(result.status == 1 && result.stderr.split(separator: "\n").count == 1, "\(name): \(result.stderr)")
        }
        #expect(try CLI.run(["list", pool]).text.split(separator: "\n").count == 1)
    }

    @Test("resize to a smaller size needs --shrink and says how much mapped data it drops")
    func resizeShrink() throws {
        let pool = temporaryPath("shrink.pool")
        try CLI.run(["init", pool, "--size", "16M"])
        try CLI.run(["create", pool, "v", "--size", "1M"])
        let payload = randomBytes(1 << 20, seed: 9)
        try CLI.run(["write", pool, "v"], stdin: payload)
        let refused = try CLI.run(["resize", pool, "v", "--size", "256K"])
        #expect(refused.status == 1 && refused.stderr.contains("786432 mapped bytes") && refused.stderr.contains("--shrink"), "\(refused.stderr)")
        #expect(try CLI.run(["read", pool, "v"]).stdout == payload)
        let shrunk = try CLI.run(["resize", pool, "v", "--size", "256K", "--shrink"])
        #expect(shrunk.status == 0 && shrunk.stderr.contains("dropped 786432 bytes"), "\(shrunk.stderr)")
        #expect(try CLI.run(["read", pool, "v"]).stdout == payload.prefix(256 << 10))
    }

    /// Binary data is not written to a terminal unless asked for, and `write` does not
    /// wait for a terminal to type a disk image.
    @Test("read to a terminal needs --output -; write from a terminal is refused with a hint")
    func terminals() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/script") else {
            print("skipped: util-linux script(1), which gives a command a terminal, is missing")
            return
        }
        let pool = temporaryPath("tty.pool")
        try CLI.run(["init", pool, "--size", "16M"])
        try CLI.run(["create", pool, "v", "--size", "64K"])
        let read = try shell("script -qec \"\\\"$LOGPOOL\\\" read \(pool) v\" /dev/null")
        #expect(read.text.contains("standard output is a terminal"), "\(read.text)")
        let forced = try shell("script -qec \"\\\"$LOGPOOL\\\" read \(pool) v --length 4 --output -; echo status=\\$?\" /dev/null")
        #expect(forced.text.contains("status=0"), "\(forced.text)")
        let write = try shell("script -qec \"\\\"$LOGPOOL\\\" write \(pool) v\" /dev/null")
        #expect(write.text.contains("standard input is a terminal"), "\(write.text)")
    }

    @Test("torture removes its pool and log when stopped with SIGTERM")
    func tortureCleansUpOnSIGTERM() throws {
        let directory = temporaryPath("torture-term")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: CLI.simBinary)
        process.arguments = ["torture", "--seconds", "60", "--dir", directory]
        let err = Pipe()
        process.standardError = err
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        // Wait until the pool exists, then stop the run.
        for _ in 0..<200 where (try? FileManager.default.contentsOfDirectory(atPath: directory))?.isEmpty ?? true { usleep(50_000) }
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(process.terminationStatus == 128 + SIGTERM, "\(stderr)")
        #expect(stderr.contains("interrupted by signal 15") && !stderr.contains("error:"), "\(stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty)
    }

    @Test("demo --dir keeps its pool and says so; without --dir it leaves nothing behind")
    func demoSaysWhatItKeeps() throws {
        let directory = temporaryPath("demo")
        let kept = try CLI.run(["demo", "--dir", directory])
        #expect(kept.status == 0 && kept.text.contains("pool kept at \(directory)/demo.pool"), "\(kept.text)\(kept.stderr)")
        #expect(FileManager.default.fileExists(atPath: directory + "/demo.pool"))
        let again = try CLI.run(["demo", "--dir", directory])
        #expect(again.status == 1 && again.stderr.contains("already exists"), "\(again.stderr)")
    }
}
