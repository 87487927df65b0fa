import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The pool `logpool serve` holds open, set while its control socket listens (Specs/SERVE.md
/// §3): `withWritablePool` and `openForReading` on the threads that run clients' commands
/// then use it whatever path the command names.
enum ServedPool {
    private static let slot = Mutex<Pool?>(nil)
    static var current: Pool? { slot.withLock { $0 } }
    static func set(_ pool: Pool?) { slot.withLock { $0 = pool } }

    /// Prefix of the temporary snapshots an export of a served volume takes.
    static let temporaryPrefix = ".export-"
    /// Temporary snapshots that exist now; the server destroys any left when it stops.
    private static let temporaries = Mutex<Set<String>>([])
    private static let counter = Atomic<Int>(0)

    /// Takes a temporary snapshot of `source` for an export: `.export-PID-N`.
    static func temporarySnapshot(of source: String, in pool: Pool) throws -> (name: String, volume: Volume) {
        let name = temporaryPrefix + "\(getpid())-\(counter.add(1, ordering: .relaxed).newValue)"
        let volume = try pool.snapshot(source: source, name: name)
        temporaries.withLock { _ = $0.insert(name) }
        return (name, volume)
    }

    /// Destroys a temporary snapshot (and syncs, so it is gone for good).
    static func destroyTemporary(_ name: String, in pool: Pool) {
        try? pool.delete(name: name)
        try? pool.sync()
        _ = temporaries.withLock { $0.remove(name) }
    }

    /// Destroys every temporary snapshot still there (the server is stopping).
    static func destroyTemporaries(in pool: Pool) {
        for name in temporaries.withLock({ $0 }) { destroyTemporary(name, in: pool) }
    }
}

/// One request and one answer on the control socket: a JSON object on one line each. The
/// request travels with four descriptors (SCM_RIGHTS): the client's stdin, stdout, stderr
/// and working directory.
struct ControlRequest: Codable {
    /// The command line after `logpool`, as the client was given it.
    var arguments: [String]
    /// The client started with stdin closed (descriptor 0 is /dev/null in its place).
    var inputClosed: Bool?
}

struct ControlAnswer: Codable {
    var status: Int32
    /// Set when the server refused the request before running it (wrong uid, a bad
    /// request): the client prints it. A command's own output went to the client's
    /// descriptors.
    var message: String?
}

/// The commands a served pool runs for a client: all that work on a pool, except `scrub`
/// (it reads the whole file and needs it unlocked) and `serve` itself.
let controlCommands: Set<String> = ["info", "list", "create", "snapshot", "clone", "destroy", "rename", "resize", "compact",
                                    "sync", "map", "discard", "verify", "read", "write", "export", "import"]

/// The control socket of the pool at `path`: `PATH.control`, next to it.
func controlSocketPath(forPool path: String) -> String { path + ".control" }

/// How many descriptors a request carries: stdin, stdout, stderr, working directory.
private let requestDescriptorCount = 4

/// Unix-socket plumbing shared by both ends.
enum ControlSocket {
    static func address(_ path: String) throws -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw PoolError.invalidArgument("control socket path too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in bytes.enumerated() { raw[i] = b } }
        return address
    }

    /// Reads up to a newline (at most `limit` bytes) after `start`; nil at a clean end of
    /// stream.
    static func readLine(_ fd: Int32, limit: Int, start: [UInt8] = []) throws -> [UInt8]? {
        var line = start
        if let newline = line.firstIndex(of: UInt8(ascii: "\n")) { return Array(line[..<newline]) }
        var byte: UInt8 = 0
        while true {
            let n = read(fd, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw PoolError.io(errno: errno, operation: "read the control socket", byteOffset: UInt64(line.count)) }
            if n == 0 { return line.isEmpty ? nil : line }
            if byte == UInt8(ascii: "\n") { return line }
            line.append(byte)
            guard line.count <= limit else { throw PoolError.invalidArgument("control message longer than \(limit) bytes") }
        }
    }

    /// Bytes of ancillary data that carry `count` descriptors (CMSG_SPACE).
    static func controlSpace(descriptors count: Int) -> Int {
        let align = MemoryLayout<Int>.size
        let header = (MemoryLayout<cmsghdr>.size + align - 1) / align * align
        return header + (count * MemoryLayout<Int32>.size + align - 1) / align * align
    }

    /// Sends `bytes` with `descriptors` attached (SCM_RIGHTS), then any rest of `bytes`.
    static func send(_ bytes: [UInt8], descriptors: [Int32], on fd: Int32) throws {
        let space = controlSpace(descriptors: descriptors.count)
        // UInt64 storage keeps the header aligned.
        var control = [UInt64](repeating: 0, count: space / 8)
        var sent = 0
        try bytes.withUnsafeBytes { data in
            try control.withUnsafeMutableBytes { raw in
                let header = raw.baseAddress!.assumingMemoryBound(to: cmsghdr.self)
                header.pointee.cmsg_len = MemoryLayout<cmsghdr>.size + descriptors.count * MemoryLayout<Int32>.size
                header.pointee.cmsg_level = SOL_SOCKET
                header.pointee.cmsg_type = Int32(SCM_RIGHTS)
                let payload = raw.baseAddress! + MemoryLayout<cmsghdr>.size
                for (i, descriptor) in descriptors.enumerated() {
                    payload.storeBytes(of: descriptor, toByteOffset: i * MemoryLayout<Int32>.size, as: Int32.self)
                }
                let mutableData = UnsafeMutableRawBufferPointer(mutating: data)
                let (n, _) = try messageCall(data: mutableData, control: raw, what: "send to the control socket") {
                    sendmsg(fd, $0, Int32(MSG_NOSIGNAL))
                }
                guard n > 0 else { throw PoolError.io(errno: EPIPE, operation: "send to the control socket", byteOffset: 0) }
                sent = n
            }
        }
        if sent < bytes.count {
            try writeAll(Array(bytes[sent...]), to: fd, what: "the control socket", startingAt: UInt64(sent))
        }
    }

    /// One `sendmsg` or `recvmsg` (`call`) of `data` with ancillary `control`, retried on
    /// EINTR: the byte count and the message header as the call left it.
    private static func messageCall(data: UnsafeMutableRawBufferPointer, control: UnsafeMutableRawBufferPointer, what: String,
                                    _ call: (UnsafeMutablePointer<msghdr>) -> Int) throws -> (Int, msghdr) {
        var vector = iovec(iov_base: data.baseAddress, iov_len: data.count)
        var message = msghdr()
        message.msg_control = control.baseAddress
        message.msg_controllen = control.count
        while true {
            let n = withUnsafeMutablePointer(to: &vector) { pointer -> Int in
                message.msg_iov = pointer
                message.msg_iovlen = 1
                return call(&message)
            }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw PoolError.io(errno: errno, operation: what, byteOffset: 0) }
            return (n, message)
        }
    }

    /// Receives the first bytes of a message and the descriptors attached to them (close-
    /// on-exec). Descriptors beyond `maxDescriptors` are closed and reported as truncation.
    static func receive(on fd: Int32, maxDescriptors: Int) throws -> (bytes: [UInt8], descriptors: [Int32], truncated: Bool) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        var control = [UInt64](repeating: 0, count: controlSpace(descriptors: maxDescriptors) / 8)
        var received = 0
        var descriptors: [Int32] = []
        var truncated = false
        try buffer.withUnsafeMutableBytes { data in
            try control.withUnsafeMutableBytes { raw in
                let (n, message) = try messageCall(data: data, control: raw, what: "read the control socket") {
                    recvmsg(fd, $0, Int32(MSG_CMSG_CLOEXEC))
                }
                received = n
                truncated = message.msg_flags & Int32(MSG_CTRUNC) != 0
                // Walk the headers (CMSG_FIRSTHDR / CMSG_NXTHDR).
                var offset = 0
                let align = MemoryLayout<Int>.size
                while offset + MemoryLayout<cmsghdr>.size <= message.msg_controllen {
                    let header = (raw.baseAddress! + offset).assumingMemoryBound(to: cmsghdr.self).pointee
                    guard header.cmsg_len >= MemoryLayout<cmsghdr>.size, offset + header.cmsg_len <= message.msg_controllen else { break }
                    if header.cmsg_level == SOL_SOCKET && header.cmsg_type == Int32(SCM_RIGHTS) {
                        let count = (header.cmsg_len - MemoryLayout<cmsghdr>.size) / MemoryLayout<Int32>.size
                        for i in 0..<count {
                            descriptors.append((raw.baseAddress! + offset + MemoryLayout<cmsghdr>.size)
                                .loadUnaligned(fromByteOffset: i * MemoryLayout<Int32>.size, as: Int32.self))
                        }
                    }
                    offset += (header.cmsg_len + align - 1) / align * align
                }
            }
        }
        if descriptors.count > maxDescriptors {
            for extra in descriptors[maxDescriptors...] { close(extra) }
            descriptors.removeLast(descriptors.count - maxDescriptors)
            truncated = true
        }
        return (Array(buffer[0..<received]), descriptors, truncated)
    }

    /// The uid of the process at the other end of a connected Unix socket (SO_PEERCRED).
    static func peerUID(_ fd: Int32) -> uid_t? {
        // struct ucred: pid_t pid; uid_t uid; gid_t gid.
        var credentials: (Int32, UInt32, UInt32) = (0, 0, 0)
        var length = socklen_t(MemoryLayout.size(ofValue: credentials))
        guard getsockopt(fd, SOL_SOCKET, 17 /* SO_PEERCRED */, &credentials, &length) == 0,
              Int(length) == MemoryLayout.size(ofValue: credentials) else { return nil }
        return credentials.1
    }
}

enum ControlClient {
    /// Sends this process's command, its stdin, stdout, stderr and working directory to
    /// the `logpool serve` that holds the pool at `path`, and exits with the status the
    /// command had there; throws `inUse` (the original refusal) when no server answers.
    static func forward(poolPath path: String, refusal: String) throws -> Never {
        let socketPath = controlSocketPath(forPool: path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw PoolError.inUse(refusal) }
        var address = try ControlSocket.address(socketPath)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            close(fd)
            throw PoolError.inUse(refusal)
        }
        let command = Array(CommandLine.arguments.dropFirst())
        if let name = command.first, !controlCommands.contains(name) {
            close(fd)
            throw PoolError.inUse("\(refusal); `logpool serve` holds it, and `\(oneLine(name))` does not run through its control socket (\(controlSocketPath(forPool: path))): stop the server first")
        }
        let directory = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard directory >= 0 else {
            close(fd)
            throw PoolError.io(errno: errno, operation: "open the working directory to pass to logpool serve", byteOffset: 0)
        }
        var request = try JSONEncoder().encode(ControlRequest(arguments: command, inputClosed: StandardStreams.stdinWasClosed))
        request.append(UInt8(ascii: "\n"))
        do {
            try ControlSocket.send(Array(request), descriptors: [STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO, directory], on: fd)
        } catch {
            close(directory)
            close(fd)
            throw error
        }
        close(directory)
        guard let line = try ControlSocket.readLine(fd, limit: 1 << 20),
              let answer = try? JSONDecoder().decode(ControlAnswer.self, from: Data(line))
        else {
            close(fd)
            throw PoolError.io(errno: EPROTO, operation: "read the answer of logpool serve on \(socketPath) (did it stop?)", byteOffset: 0)
        }
        close(fd)
        if let message = answer.message {
            var err = StandardError()
            print(message, to: &err)
        }
        exit(answer.status)
    }
}

/// The control socket of `logpool serve`: one thread accepts clients, and each client's
/// command runs on a thread of its own in this process, with the client's descriptors.
final class ControlServer: @unchecked Sendable {
    let path: String
    let pool: Pool
    let log: @Sendable (String) -> Void
    /// The only uid allowed to connect: the pool file's owner.
    let ownerUID: uid_t
    private let listener: Int32
    private let stopping = Mutex(false)
    private let acceptDone = DispatchSemaphore(value: 0)
    private let running = DispatchGroup()
    /// At most this many commands at once; more clients wait to be accepted.
    private let slots = DispatchSemaphore(value: 16)

    init(path: String, poolPath: String, pool: Pool, log: @escaping @Sendable (String) -> Void) throws {
        self.path = path
        self.pool = pool
        self.log = log
        var poolInfo = stat()
        guard stat(poolPath, &poolInfo) == 0 else { throw PoolError.io(errno: errno, operation: "stat \(poolPath)", byteOffset: 0) }
        ownerUID = poolInfo.st_uid
        unlink(path)
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listener >= 0 else { throw PoolError.io(errno: errno, operation: "create the control socket", byteOffset: 0) }
        var address = try ControlSocket.address(path)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(listener, 16) == 0 else {
            let code = errno
            close(listener)
            throw PoolError.io(errno: code, operation: "listen on the control socket \(path)", byteOffset: 0)
        }
        // Only the owner may connect: the socket file is theirs, mode 0600 (a server run
        // as root for another user's pool hands it over), and every peer's uid is checked.
        if geteuid() == 0 && ownerUID != 0 { _ = lchown(path, ownerUID, gid_t.max) }
        _ = chmod(path, 0o600)
        ServedPool.set(pool)
        if let stale = try? pool.list().map(\.name).filter({ $0.hasPrefix(ServedPool.temporaryPrefix) }), !stale.isEmpty {
            log("warning: \(stale.count) temporary export snapshots from a server that did not stop cleanly: \(stale.map(oneLine).joined(separator: ", ")); destroy them with logpool destroy")
        }
        log("control socket \(path) (uid \(ownerUID) only, the pool file's owner)")
        Thread { self.acceptLoop() }.start()
    }

    private func acceptLoop() {
        defer { acceptDone.signal() }
        while !stopping.withLock({ $0 }) {
            slots.wait()
            // accept4 needs _GNU_SOURCE; the listener is close-on-exec and nothing here execs.
            let client = accept(listener, nil, nil)
            if client < 0 {
                slots.signal()
                if errno == EINTR || errno == ECONNABORTED { continue }
                if stopping.withLock({ $0 }) { return }
                log("control socket: accept failed: errno \(errno)")
                continue
            }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            // A client that connects and sends nothing must not hold a command slot for
            // ever: its request has 10 s to arrive.
            var timeout = timeval(tv_sec: 10, tv_usec: 0)
            _ = setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            running.enter()
            Thread {
                self.serve(client)
                close(client)
                self.slots.signal()
                self.running.leave()
            }.start()
        }
    }

    private func answer(_ answer: ControlAnswer, on client: Int32) {
        guard var bytes = try? JSONEncoder().encode(answer) else { return }
        bytes.append(UInt8(ascii: "\n"))
        _ = try? bytes.withUnsafeBytes { try writeAll($0, to: client, what: "the control socket", startingAt: 0) }
    }

    private func serve(_ client: Int32) {
        guard let uid = ControlSocket.peerUID(client), uid == ownerUID else {
            let who = ControlSocket.peerUID(client).map { "uid \($0)" } ?? "a peer of unknown uid"
            log("control socket: refused \(who): only uid \(ownerUID), the pool file's owner, may use it")
            // The request is taken off the socket (its descriptors closed unused) so the
            // client is not cut off mid-send and reads the refusal.
            if let request = try? ControlSocket.receive(on: client, maxDescriptors: requestDescriptorCount) {
                for fd in request.descriptors { close(fd) }
            }
            answer(ControlAnswer(status: 1, message: "logpool: error: logpool serve refused the command: the control socket accepts only uid \(ownerUID), the owner of the pool file"), on: client)
            return
        }
        var descriptors: [Int32] = []
        // Closed before the answer, so the client's pipes end when the client exits.
        func closeDescriptors() {
            for fd in descriptors { close(fd) }
            descriptors = []
        }
        defer { closeDescriptors() }
        let request: ControlRequest
        do {
            let first = try ControlSocket.receive(on: client, maxDescriptors: requestDescriptorCount)
            descriptors = first.descriptors
            guard let line = try ControlSocket.readLine(client, limit: 1 << 20, start: first.bytes) else { return }
            guard descriptors.count == requestDescriptorCount, !first.truncated else {
                throw PoolError.invalidArgument("the request carried \(descriptors.count) descriptors, not \(requestDescriptorCount) (stdin, stdout, stderr, working directory)")
            }
            request = try JSONDecoder().decode(ControlRequest.self, from: Data(line))
        } catch {
            log("control socket: bad request: \(oneLine("\(error)"))")
            answer(ControlAnswer(status: 64, message: "logpool: error: bad control request: \(oneLine("\(error)"))"), on: client)
            return
        }
        let streams = ClientStreams(input: descriptors[0], output: descriptors[1], error: descriptors[2], directory: descriptors[3],
                                    inputWasClosed: request.inputClosed ?? false, connection: client,
                                    stopping: { [self] in self.stopping.withLock { $0 } })
        let status = run(request.arguments, streams: streams)
        closeDescriptors()
        answer(ControlAnswer(status: status), on: client)
    }

    /// Runs one command line against the served pool with a client's streams; its exit
    /// status.
    func run(_ arguments: [String], streams: ClientStreams) -> Int32 {
        guard let name = arguments.first, controlCommands.contains(name) else {
            let what = arguments.first.map { "`\(oneLine($0))`" } ?? "an empty command"
            var err = StandardError()
            CommandStreams.with(streams) { print("logpool: error: \(what) does not run through the control socket", to: &err) }
            return 64
        }
        log("control socket: \(arguments.map(oneLine).joined(separator: " "))")
        return CommandStreams.with(streams) { runCommand(LogPoolCommand.self, name: "logpool", arguments: arguments) }
    }

    /// Stops accepting, tells commands running to stop at their next chunk, waits for
    /// them, and removes the socket.
    func stop() {
        stopping.withLock { $0 = true }
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        acceptDone.wait()
        // A command blocked on its client (writing to a pipe nobody reads, reading a
        // terminal) holds no lock of the pool; it is abandoned after a grace period.
        if running.wait(timeout: .now() + .seconds(10)) == .timedOut {
            log("control socket: commands still blocked on their clients after 10 s; stopping without them")
        }
        ServedPool.destroyTemporaries(in: pool)
        ServedPool.set(nil)
        unlink(path)
    }
}
