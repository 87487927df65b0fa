import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `logpool serve` against real NBD clients (qemu-img, qemu-io from qemu-utils) and a
/// hostile client of our own (issue 10).
@Suite("logpool serve (NBD)", .serialized)
struct ServeTests {
    /// A running `logpool serve` on a Unix socket; `stop()` sends SIGTERM and waits.
    final class Server {
        let process = Process()
        let socket: String
        let stderr = Pipe()

        init(pool: String, arguments: [String] = []) throws {
            socket = temporaryPath("nbd.sock")
            process.executableURL = URL(fileURLWithPath: CLI.binary)
            process.arguments = ["serve", pool, "--socket", socket] + arguments
            process.standardError = stderr
            process.standardOutput = FileHandle.nullDevice
            try process.run()
            for _ in 0..<200 where !FileManager.default.fileExists(atPath: socket) { usleep(25_000) }
        }

        func url(_ name: String) -> String { "nbd+unix:///\(name)?socket=\(socket)" }

        /// SIGTERM, then the exit status and what it logged.
        func stop() -> (Int32, String) {
            kill(process.processIdentifier, SIGTERM)
            let log = String(decoding: stderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            return (process.terminationStatus, log)
        }
    }

    static var qemu: (img: String, io: String)? {
        guard let img = DataCommandTests.which("qemu-img"), let io = DataCommandTests.which("qemu-io") else { return nil }
        return (img, io)
    }

    /// Connects to a Unix socket; the raw descriptor.
    static func connect(_ path: String) -> Int32 {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, byte) in path.utf8.prefix(raw.count - 1).enumerated() { raw[i] = byte }
        }
        let ok = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return ok == 0 ? fd : -1
    }

    @Test("qemu-img and qemu-io read and write volumes over NBD; snapshots are read-only; a bad client is dropped alone; SIGTERM closes cleanly")
    func realClients() throws {
        guard let qemu = Self.qemu else {
            print("SKIPPED: qemu-img/qemu-io not found (Debian package qemu-utils; .ci/run installs it)")
            return
        }
        signal(SIGPIPE, SIG_IGN)
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "64M"]).status == 0)
        #expect(try CLI.run(["create", pool, "disk", "--size", "16M"]).status == 0)
        #expect(try CLI.run(["write", pool, "disk", "--offset", "64K"], stdin: Data(repeating: 0x5a, count: 8192)).status == 0)
        #expect(try CLI.run(["snapshot", pool, "disk", "snap"]).status == 0)
        let server = try Server(pool: pool)

        let info = try CLI.run(["info", "-f", "raw", server.url("disk")], binary: qemu.img)
        #expect(info.status == 0, "\(info.stderr)")
        #expect(info.text.contains("16 MiB") || info.text.contains("16777216"), "\(info.text)")

        // Unaligned pattern writes and reads, then the snapshot still holds the old bytes.
        let io = try CLI.run(["-f", "raw", server.url("disk"), "-c", "write -P 0xab 1000 70000", "-c", "read -P 0xab 1000 70000",
                              "-c", "flush", "-c", "read -P 0x00 0 1000"], binary: qemu.io)
        #expect(io.status == 0 && !io.text.contains("Pattern verification failed"), "\(io.text) \(io.stderr)")
        let snap = try CLI.run(["-f", "raw", "-r", server.url("snap"), "-c", "read -P 0x5a 65536 8192"], binary: qemu.io)
        #expect(snap.status == 0 && !snap.text.contains("Pattern verification failed"), "\(snap.text) \(snap.stderr)")
        let refused = try CLI.run(["-f", "raw", server.url("snap"), "-c", "write -P 1 0 4096"], binary: qemu.io)
        // The export is flagged read-only, so qemu-io refuses to open it for writing.
        #expect(refused.stderr.contains("Permission denied") || refused.text.contains("Operation not permitted"), "\(refused.text) \(refused.stderr)")

        // A hostile client: garbage instead of the client flags, then a bad option magic.
        for junk in [Data(repeating: 0xff, count: 64), Data([0, 0, 0, 1] + [UInt8](repeating: 0x41, count: 40))] {
            let fd = Self.connect(server.socket)
            #expect(fd >= 0)
            var hello = [UInt8](repeating: 0, count: 18)
            #expect(read(fd, &hello, 18) == 18)
            _ = junk.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            var byte: UInt8 = 0
            #expect(read(fd, &byte, 1) <= 0, "the server closes a malformed connection")
            close(fd)
        }

        // qemu-img copies the whole export out; it compares equal to the export itself.
        let out = temporaryPath("disk.raw")
        #expect(try CLI.run(["convert", "-f", "raw", "-O", "raw", server.url("disk"), out], binary: qemu.img).status == 0)
        let compared = try CLI.run(["compare", "-f", "raw", "-F", "raw", server.url("disk"), out], binary: qemu.img)
        #expect(compared.status == 0, "\(compared.text) \(compared.stderr)")
        let bytes = try Data(contentsOf: URL(fileURLWithPath: out))
        #expect(bytes.count == 16 << 20)
        #expect(bytes[1000..<71000].allSatisfy { $0 == 0xab })
        #expect(bytes[71000..<(72 << 10)].allSatisfy { $0 == 0x5a })

        let (status, log) = server.stop()
        #expect(status == 0, "\(log)")
        #expect(log.contains("connected") && log.contains("closing the connection"), "\(log)")
        // The pool was closed cleanly and holds what the clients wrote.
        let cleanly = try CLI.run(["info", pool]).text.split(separator: "\n").first { $0.hasPrefix("cleanly closed") }
        #expect(cleanly?.hasSuffix("yes") == true, "\(cleanly ?? "no line")")
        #expect(try CLI.run(["read", pool, "disk", "--offset", "1000", "--length", "70000"]).stdout == Data(repeating: 0xab, count: 70000))
    }

    @Test("nbdinfo and nbdcopy: exports listed, block status equals logpool map, multi-conn, copies in and out")
    func libnbdClients() throws {
        guard let nbdinfo = DataCommandTests.which("nbdinfo"), let nbdcopy = DataCommandTests.which("nbdcopy") else {
            print("SKIPPED: nbdinfo/nbdcopy not found (Debian package libnbd-bin; .ci/run installs it)")
            return
        }
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "64M"]).status == 0)
        #expect(try CLI.run(["create", pool, "disk", "--size", "16M"]).status == 0)
        #expect(try CLI.run(["create", pool, "empty", "--size", "4M"]).status == 0)
        let payload = Data((0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) | 1 })
        #expect(try CLI.run(["write", pool, "disk", "--offset", "3M"], stdin: payload).status == 0)
        #expect(try CLI.run(["snapshot", pool, "disk", "snap"]).status == 0)
        // What logpool map says, before the pool is locked by the server.
        let expected = try CLI.run(["map", pool, "disk"]).text.split(separator: "\n").dropFirst().map { line in
            line.split(separator: " ").map(String.init)
        }
        let server = try Server(pool: pool)
        defer { _ = server.stop() }
        let list = try CLI.run(["--list", "nbd+unix:///?socket=\(server.socket)"], binary: nbdinfo)
        #expect(list.status == 0, "\(list.stderr)")
        for name in ["disk", "empty", "snap"] { #expect(list.text.contains("export=\"\(name)\""), "\(list.text)") }
        #expect(list.text.contains("base:allocation"))
        // Block status (base:allocation) gives exactly logpool map's runs.
        let map = try CLI.run(["--map", server.url("disk")], binary: nbdinfo)
        #expect(map.status == 0, "\(map.stderr)")
        let runs = map.text.split(separator: "\n").map { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            return [fields[0], fields[1], fields[2] == "0" ? "data" : "hole"]
        }
        #expect(runs == expected, "nbdinfo --map \(runs), logpool map \(expected)")
        #expect(try CLI.run(["--can", "multi-conn", server.url("disk")], binary: nbdinfo).status == 0)
        // nbdcopy out to a file and back into another export, with several connections.
        let out = temporaryPath("disk.raw")
        let copied = try CLI.run(["--connections=4", server.url("disk"), out], binary: nbdcopy)
        #expect(copied.status == 0, "\(copied.stderr)")
        let bytes = try Data(contentsOf: URL(fileURLWithPath: out))
        let copiedRight = bytes.count == 16 << 20 && bytes[(3 << 20)..<((3 << 20) + payload.count)] == payload
        #expect(copiedRight)
        let small = temporaryPath("small.raw")
        try Data(bytes.prefix(4 << 20)).write(to: URL(fileURLWithPath: small))
        #expect(try CLI.run([small, server.url("empty")], binary: nbdcopy).status == 0)
        let back = temporaryPath("back.raw")
        #expect(try CLI.run([server.url("empty"), back], binary: nbdcopy).status == 0)
        let roundTrip = try Data(contentsOf: URL(fileURLWithPath: back)) == bytes.prefix(4 << 20)
        #expect(roundTrip)
        // Into a snapshot: refused.
        #expect(try CLI.run([small, server.url("snap")], binary: nbdcopy).status != 0)
    }

    @Test("a full pool answers ENOSPC over NBD, changes nothing, and overwrites still work")
    func fullPool() throws {
        guard let qemu = Self.qemu else {
            print("SKIPPED: qemu-img/qemu-io not found (Debian package qemu-utils; .ci/run installs it)")
            return
        }
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "16M", "--compression", "none"]).status == 0)
        #expect(try CLI.run(["create", pool, "thin", "--size", "32M"]).status == 0)
        let server = try Server(pool: pool)
        let url = server.url("thin")
        #expect(try CLI.run(["-f", "raw", url, "-c", "write -P 0x11 0 1M", "-c", "flush"], binary: qemu.io).status == 0)
        // Far more than the pool holds: the write that does not fit is refused with ENOSPC.
        let full = try CLI.run(["-f", "raw", url, "-c", "write -P 0x22 1M 30M"], binary: qemu.io)
        #expect((full.text + full.stderr).contains("No space left on device"), "\(full.text) \(full.stderr)")
        // Blocks the volume owns alone can still be overwritten, and read back.
        let again = try CLI.run(["-f", "raw", url, "-c", "write -P 0x33 0 64k", "-c", "read -P 0x33 0 64k", "-c", "read -P 0x11 64k 960k"],
                                binary: qemu.io)
        #expect(again.status == 0 && !again.text.contains("Pattern verification failed") && !again.stderr.contains("error"),
                "\(again.text) \(again.stderr)")
        let (status, log) = server.stop()
        #expect(status == 0)
        #expect(log.contains("pool full"), "the refusal is logged: \(log.suffix(400))")
        #expect(try CLI.run(["verify", pool]).status == 0)
    }

    @Test("the thesis on a real kernel: ext4 and XFS on an overcommitted volume fill, the snapshot stays intact (scripts/thesis.sh)",
          arguments: ["ext4", "xfs"])
    func thesis(filesystem: String) throws {
        let script = CLI.root.appendingPathComponent("scripts/thesis.sh").path
        let result = try CLI.run([script, CLI.binary, filesystem], binary: "/bin/bash")
        if result.status == 77 {
            print(result.text.split(separator: "\n").last.map(String.init) ?? "SKIPPED: thesis.sh \(filesystem)")
            return
        }
        #expect(result.status == 0, "thesis.sh \(filesystem) exited \(result.status):\n\(result.text.suffix(3000))\n\(result.stderr.suffix(2000))")
    }

    @Test("while serving, the CLI reaches the pool through the control socket with the same output and exit codes")
    func controlSocket() throws {
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "32M"]).status == 0)
        #expect(try CLI.run(["create", pool, "disk", "--size", "8M"]).status == 0)
        #expect(try CLI.run(["write", pool, "disk"], stdin: Data(repeating: 9, count: 8192)).status == 0)
        let offlineList = try CLI.run(["list", pool]).text
        let offlineMap = try CLI.run(["map", pool, "disk", "--json"]).text
        let server = try Server(pool: pool)
        #expect(FileManager.default.fileExists(atPath: pool + ".control"))
        // Same output as offline.
        #expect(try CLI.run(["list", pool]).text == offlineList)
        #expect(try CLI.run(["map", pool, "disk", "--json"]).text == offlineMap)
        // Changes, and their errors with the offline exit codes and messages.
        #expect(try CLI.run(["snapshot", pool, "disk", "snap"]).status == 0)
        let exists = try CLI.run(["create", pool, "disk", "--size", "1M"])
        #expect(exists.status == 1 && exists.stderr.contains("already exists"), "\(exists.stderr)")
        let usage = try CLI.run(["create", pool, "x", "--size", "banana"])
        #expect(usage.status == 64, "\(usage.stderr)")
        #expect(try CLI.run(["create", pool, "more", "--size", "4M"]).status == 0)
        #expect(try CLI.run(["discard", pool, "disk", "--offset", "0", "--length", "4K"]).status == 0)
        // The new snapshot is served at once; commands that need stdin or files are refused clearly.
        #expect(try CLI.run(["info", pool]).status == 0)
        // verify checks the live state; --repair needs the file to itself.
        let live = try CLI.run(["verify", pool])
        #expect(live.status == 0 && live.text.contains("live state of the served pool: 0 errors"), "\(live.text) \(live.stderr)")
        #expect(try CLI.run(["verify", pool, "--repair"]).status == 64)
        #expect(try CLI.run(["scrub", pool]).status != 0)
        let scrub = try CLI.run(["scrub", pool])
        #expect(scrub.status == 8 && scrub.stderr.contains("stop the server first"), "\(scrub.stderr)")
        // Data commands run in the server with the client's own stdin, stdout and working
        // directory (passed over the socket): write, read, export (of a writable volume,
        // through a temporary snapshot) and import, relative paths included.
        let payload = Data((0..<20_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) })
        let write = try CLI.run(["write", pool, "disk", "--offset", "4096"], stdin: payload)
        #expect(write.status == 0, "\(write.stderr)")
        let read = try CLI.run(["read", pool, "disk", "--offset", "4096", "--length", "20000"])
        #expect(read.status == 0 && read.stdout == payload, "\(read.stderr)")
        let directory = temporaryPath("client")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let export = try CLI.run(["export", pool, "disk", "image.raw"], directory: directory)
        #expect(export.status == 0, "\(export.stderr)")
        let image = (try? Data(contentsOf: URL(fileURLWithPath: directory + "/image.raw"))) ?? Data()
        #expect(image.count == 8 << 20)
        #expect(image.count == 8 << 20 && image[4096..<24096] == payload && image[0..<4096].allSatisfy { $0 == 0 } && image[24096...].allSatisfy { $0 == 0 })
        #expect(!(try CLI.run(["list", pool]).text.contains(".export-")), "the temporary snapshot is destroyed")
        let imported = try CLI.run(["import", pool, "image.raw", "copy"], directory: directory)
        #expect(imported.status == 0, "\(imported.stderr)")
        #expect(try CLI.run(["read", pool, "copy"]).stdout == image)
        let full = try CLI.run(["read", pool, "disk", "--output", "/dev/full"])
        #expect(full.status == 1 && full.stderr.contains("at byte offset 0"), "\(full.stderr)")
        #expect(try CLI.run(["sync", pool]).status == 0)
        // Only the pool file's owner may use the control socket (peer credentials), even
        // when the socket file would let others connect.
        if getuid() == 0, let setpriv = DataCommandTests.which("setpriv") {
            chmod(pool + ".control", 0o666)
            let other = try CLI.run(["--reuid=65534", "--regid=65534", "--clear-groups", CLI.binary, "list", pool], binary: setpriv)
            #expect(other.status == 1 && other.stderr.contains("accepts only uid 0"), "\(other.status) \(other.stderr)")
        } else {
            print("skipped: the control socket's uid check needs root and setpriv (util-linux)")
        }
        let (status, log) = server.stop()
        #expect(status == 0, "\(log)")
        #expect(!FileManager.default.fileExists(atPath: pool + ".control"), "the control socket is removed at exit")
        let list = try CLI.run(["list", pool]).text
        #expect(list.contains("snap") && list.contains("more") && list.contains("copy"), "\(list)")
        // The discard made through the control socket is durable: block 0 is a hole now.
        let map = try JSONSerialization.jsonObject(with: try CLI.run(["map", pool, "disk", "--json"]).stdout) as? [[String: Any]]
        #expect(map?.first?["data"] as? Bool == false && map?.first?["length"] as? Int == 4096, "\(String(describing: map))")
        #expect(try CLI.run(["read", pool, "disk", "--offset", "4096", "--length", "20000"]).stdout == payload)
        #expect(map?.dropFirst().first?["data"] as? Bool == true)
        #expect(try CLI.run(["verify", pool]).status == 0)
    }

    /// A TCP port on 127.0.0.1 that was free a moment ago.
    static func freePort() -> Int {
        let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    @Test("an ext4 image over TCP: imported, snapshotted and exported through the server, it compares equal to the NBD export and passes e2fsck -fn")
    func ext4ImageOverTCP() throws {
        guard let qemu = Self.qemu, let mkfs = DataCommandTests.which("mkfs.ext4"), let fsck = DataCommandTests.which("e2fsck") else {
            print("SKIPPED: needs qemu-img and e2fsprogs (Debian packages qemu-utils, e2fsprogs; .ci/run installs them)")
            return
        }
        // mkfs.ext4 on a regular file needs no root; the file is sparse.
        let raw = temporaryPath("fs.raw")
        #expect(FileManager.default.createFile(atPath: raw, contents: nil))
        #expect(truncate(raw, 64 << 20) == 0)
        let made = try CLI.run(["-q", "-F", "-E", "root_owner=0:0", raw], binary: mkfs)
        #expect(made.status == 0, "\(made.stderr)")
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "64M"]).status == 0)
        let port = Self.freePort()
        let server = try Server(pool: pool, arguments: ["--listen", "127.0.0.1:\(port)"])
        // Import and snapshot through the control socket, then write over the live volume.
        let imported = try CLI.run(["import", pool, raw, "fs"])
        #expect(imported.status == 0, "\(imported.stderr)")
        #expect(try CLI.run(["snapshot", pool, "fs", "fs@1"]).status == 0)
        let tcp = "nbd://127.0.0.1:\(port)/"
        let overwrite = try CLI.run(["-f", "raw", tcp + "fs", "-c", "write -P 0xee 0 1M"], binary: qemu.io)
        #expect(overwrite.status == 0, "\(overwrite.text) \(overwrite.stderr)")
        let info = try CLI.run(["info", "-f", "raw", tcp + "fs@1"], binary: qemu.img)
        #expect(info.status == 0 && info.text.contains("64 MiB"), "\(info.text) \(info.stderr)")
        // The exported snapshot equals the snapshot's NBD export and the image it came from,
        // and is a clean ext4.
        let exported = temporaryPath("fs1.raw")
        let export = try CLI.run(["export", pool, "fs@1", exported])
        #expect(export.status == 0, "\(export.stderr)")
        let compared = try CLI.run(["compare", "-f", "raw", "-F", "raw", exported, tcp + "fs@1"], binary: qemu.img)
        #expect(compared.status == 0, "\(compared.text) \(compared.stderr)")
        #expect(try CLI.run(["compare", "-f", "raw", "-F", "raw", exported, raw], binary: qemu.img).status == 0)
        let checked = try CLI.run(["-fn", exported], binary: fsck)
        #expect(checked.status == 0, "\(checked.text) \(checked.stderr)")
        // qemu-img convert over TCP writes the same bytes.
        let converted = temporaryPath("fs1-nbd.raw")
        #expect(try CLI.run(["convert", "-f", "raw", "-O", "raw", tcp + "fs@1", converted], binary: qemu.img).status == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: converted)) == (try Data(contentsOf: URL(fileURLWithPath: exported))))
        let (status, log) = server.stop()
        #expect(status == 0, "\(log)")
        #expect(log.contains("127.0.0.1"), "\(log)")
    }

    @Test("fio's nbd engine: random writes at queue depth 16 verify (crc32c) on read-back")
    func fio() throws {
        guard let fio = DataCommandTests.which("fio") else {
            print("SKIPPED: fio not found (Debian package fio; .ci/run installs it)")
            return
        }
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "64M"]).status == 0)
        #expect(try CLI.run(["create", pool, "disk", "--size", "32M"]).status == 0)
        let server = try Server(pool: pool)
        let run = try CLI.run(["--name=verify", "--ioengine=nbd", "--uri=\(server.url("disk"))", "--rw=randwrite", "--bs=4k",
                               "--size=16M", "--iodepth=16", "--fsync=32", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                               "--randrepeat=1", "--verify_state_save=0", "--output-format=terse"], binary: fio)
        #expect(run.status == 0, "\(run.text.suffix(1000)) \(run.stderr.suffix(1000))")
        let (status, log) = server.stop()
        #expect(status == 0, "\(log)")
        #expect(try CLI.run(["verify", pool]).status == 0)
    }

    /// A minimal NBD client of our own: fixed newstyle, NBD_OPT_GO, simple replies.
    struct RawClient {
        let fd: Int32

        func send(_ bytes: [UInt8]) { _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } }
        func receive(_ count: Int) -> [UInt8]? {
            var out = [UInt8](repeating: 0, count: count)
            var got = 0
            while got < count {
                let n = out.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, count - got) }
                if n <= 0 { return nil }
                got += n
            }
            return out
        }
        static func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] { withUnsafeBytes(of: value.bigEndian) { Array($0) } }
        static func int<T: FixedWidthInteger>(_ bytes: ArraySlice<UInt8>) -> T { bytes.reduce(T(0)) { $0 << 8 | T($1) } }

        /// Connects and negotiates `export` with NBD_OPT_GO; nil when refused.
        static func open(_ socket: String, export: String) -> RawClient? {
            let fd = ServeTests.connect(socket)
            guard fd >= 0 else { return nil }
            let client = RawClient(fd: fd)
            guard client.receive(18) != nil else { return nil }
            client.send(be(UInt32(3)))  // FIXED_NEWSTYLE | NO_ZEROES
            let name = Array(export.utf8)
            let data = be(UInt32(name.count)) + name + be(UInt16(0))
            client.send(be(UInt64(0x4948_4156_454F_5054)) + be(UInt32(7)) + be(UInt32(data.count)) + data)
            while true {
                guard let header = client.receive(20) else { return nil }
                let type: UInt32 = int(header[12..<16]), length: UInt32 = int(header[16..<20])
                guard client.receive(Int(length)) != nil else { return nil }
                if type == 1 { return client }  // ACK: transmission
                if type & 0x8000_0000 != 0 { return nil }
            }
        }

        /// Sends a request (no read of the reply).
        func request(_ type: UInt16, handle: UInt64, offset: UInt64, length: UInt32, flags: UInt16 = 0, payload: [UInt8] = []) {
            send(RawClient.be(UInt32(0x2560_9513)) + RawClient.be(flags) + RawClient.be(type) + RawClient.be(handle)
                 + RawClient.be(offset) + RawClient.be(length) + payload)
        }

        /// Reads one simple reply: (handle, error), then `dataLength` bytes when error is 0.
        func reply(dataLength: (UInt64) -> Int) -> (handle: UInt64, error: UInt32, data: [UInt8])? {
            guard let header = receive(16) else { return nil }
            let error: UInt32 = RawClient.int(header[4..<8]), handle: UInt64 = RawClient.int(header[8..<16])
            let data = error == 0 ? (receive(dataLength(handle)) ?? []) : []
            return (handle, error, data)
        }
    }

    @Test("our own client: pipelined requests answered by handle; bad requests get EINVAL or EPERM and the connection stays")
    func protocolErrors() throws {
        signal(SIGPIPE, SIG_IGN)
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "32M"]).status == 0)
        #expect(try CLI.run(["create", pool, "disk", "--size", "1M"]).status == 0)
        #expect(try CLI.run(["snapshot", pool, "disk", "snap"]).status == 0)
        let server = try Server(pool: pool)
        defer { _ = server.stop() }
        #expect(RawClient.open(server.socket, export: "nope") == nil)
        guard let client = RawClient.open(server.socket, export: "disk") else {
            Issue.record("NBD_OPT_GO for disk was refused")
            return
        }
        let block = [UInt8](repeating: 0x77, count: 4096)
        // Pipelined: eight writes and a flush before any reply is read, then eight reads
        // (requests in flight together are unordered, so reads wait for the writes' replies).
        for i in 0..<8 { client.request(1, handle: UInt64(i), offset: UInt64(i) * 4096, length: 4096, payload: block) }
        client.request(3, handle: 100, offset: 0, length: 0)
        var seen = Set<UInt64>()
        for _ in 0..<9 {
            guard let r = client.reply(dataLength: { _ in 0 }) else { Issue.record("connection closed"); return }
            #expect(r.error == 0, "handle \(r.handle) error \(r.error)")
            seen.insert(r.handle)
        }
        for i in 0..<8 { client.request(0, handle: UInt64(200 + i), offset: UInt64(i) * 4096, length: 4096) }
        for _ in 0..<8 {
            guard let r = client.reply(dataLength: { _ in 4096 }) else { Issue.record("connection closed"); return }
            let same = r.data == block
            #expect(r.error == 0 && same, "handle \(r.handle) error \(r.error), data as written: \(same)")
            seen.insert(r.handle)
        }
        #expect(seen == Set((0..<8).map(UInt64.init) + [100] + (200..<208).map(UInt64.init)))
        // Out of range, over 32 MiB, unknown command, an oversized write (payload dropped):
        // EINVAL each, and the connection goes on.
        client.request(0, handle: 1, offset: 1 << 20, length: 1)
        #expect(client.reply(dataLength: { _ in 0 })?.error == 22)
        client.request(0, handle: 2, offset: 0, length: (32 << 20) + 1)
        #expect(client.reply(dataLength: { _ in 0 })?.error == 22)
        client.request(42, handle: 3, offset: 0, length: 0)
        #expect(client.reply(dataLength: { _ in 0 })?.error == 22)
        client.request(1, handle: 4, offset: 0, length: (32 << 20) + 4096, payload: [UInt8](repeating: 1, count: (32 << 20) + 4096))
        #expect(client.reply(dataLength: { _ in 0 })?.error == 22)
        client.request(0, handle: 5, offset: 0, length: 4096)
        let after = client.reply(dataLength: { _ in 4096 })
        let same = after?.data == block
        #expect(after?.error == 0 && same, "the connection still serves after the refused write")
        close(client.fd)
        // A write to the snapshot: EPERM.
        guard let snap = RawClient.open(server.socket, export: "snap") else { Issue.record("snap refused"); return }
        snap.request(1, handle: 9, offset: 0, length: 4096, payload: block)
        #expect(snap.reply(dataLength: { _ in 0 })?.error == 1)
        // A wrong request magic closes that connection only.
        snap.send([UInt8](repeating: 0xee, count: 28))
        #expect(snap.receive(1) == nil)
        close(snap.fd)
        #expect(RawClient.open(server.socket, export: "disk") != nil)
    }

    @Test("serve refuses bad arguments before touching the pool")
    func arguments() throws {
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "16M"]).status == 0)
        #expect(try CLI.run(["serve", pool]).status == 64)
        #expect(try CLI.run(["serve", pool, "--listen", "localhost:99999"]).status == 64)
        #expect(try CLI.run(["serve", pool, "--socket", temporaryPath("s.sock"), "--export", "nope"]).status == 1)
        #expect(try CLI.run(["info", pool]).status == 0)
    }
}
