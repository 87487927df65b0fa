import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The pool `logpool serve` holds open, set while it runs a command from its control
/// socket (Specs/SERVE.md §3): `withWritablePool` and `openForReading` then use it
/// whatever path the command names.
enum ServedPool {
    private static let slot = Mutex<Pool?>(nil)
    static var current: Pool? { slot.withLock { $0 } }
    static func set(_ pool: Pool?) { slot.withLock { $0 = pool } }
}

/// One request and one answer on the control socket: a JSON object on one line each.
struct ControlRequest: Codable {
    /// The command line after `logpool`, as the client was given it.
    var arguments: [String]
}

struct ControlAnswer: Codable {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// The commands a served pool runs for a client. Commands that read the client's stdin
/// or write files (write, read, import, export) run against NBD instead; scrub reads the
/// whole file and needs it unlocked. `verify` checks the served pool's live state.
let controlCommands: Set<String> = ["info", "list", "create", "snapshot", "clone", "destroy", "rename", "resize", "compact", "map", "discard", "verify"]

/// The control socket of the pool at `path`: `PATH.control`, next to it.
func controlSocketPath(forPool path: String) -> String { path + ".control" }

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

    /// Reads up to a newline (at most `limit` bytes); nil at a clean end of stream.
    static func readLine(_ fd: Int32, limit: Int) throws -> [UInt8]? {
        var line: [UInt8] = []
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
}

enum ControlClient {
    /// Sends this process's command to the `logpool serve` that holds the pool at `path`
    /// and exits with its answer; throws `inUse` (the original refusal) when no server
    /// answers there.
    static func forward(poolPath path: String, refusal: String) throws -> Never {
        let socketPath = controlSocketPath(forPool: path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
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
            throw PoolError.inUse("\(refusal); `logpool serve` holds it, and `\(oneLine(name))` does not run through its control socket (\(controlSocketPath(forPool: path))): use NBD, or stop the server")
        }
        var request = try JSONEncoder().encode(ControlRequest(arguments: command))
        request.append(UInt8(ascii: "\n"))
        try request.withUnsafeBytes { _ = try writeAll($0, to: fd, what: "the control socket", startingAt: 0) }
        guard let line = try ControlSocket.readLine(fd, limit: 64 << 20),
              let answer = try? JSONDecoder().decode(ControlAnswer.self, from: Data(line))
        else {
            close(fd)
            throw PoolError.io(errno: EPROTO, operation: "read the answer of logpool serve on \(socketPath)", byteOffset: 0)
        }
        close(fd)
        try out(answer.stdout, terminator: "")
        var err = StandardError()
        print(answer.stderr, terminator: "", to: &err)
        exit(answer.status)
    }
}

/// The control socket of `logpool serve`: one thread accepts clients one at a time and
/// runs each command in this process, against the served pool, with its output captured.
final class ControlServer: @unchecked Sendable {
    let path: String
    let pool: Pool
    let log: @Sendable (String) -> Void
    private let listener: Int32
    private let stopping = Mutex(false)
    private let done = DispatchSemaphore(value: 0)

    init(path: String, pool: Pool, log: @escaping @Sendable (String) -> Void) throws {
        self.path = path
        self.pool = pool
        self.log = log
        unlink(path)
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
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
        log("control socket \(path)")
        Thread { self.acceptLoop() }.start()
    }

    private func acceptLoop() {
        defer { done.signal() }
        while !stopping.withLock({ $0 }) {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                if stopping.withLock({ $0 }) { return }
                log("control socket: accept failed: errno \(errno)")
                continue
            }
            serve(client)
            close(client)
        }
    }

    private func serve(_ client: Int32) {
        let answer: ControlAnswer
        do {
            guard let line = try ControlSocket.readLine(client, limit: 1 << 20) else { return }
            let request = try JSONDecoder().decode(ControlRequest.self, from: Data(line))
            answer = run(request.arguments)
        } catch {
            log("control socket: bad request: \(error)")
            answer = ControlAnswer(status: 64, stdout: "", stderr: "logpool: error: bad control request: \(oneLine("\(error)"))\n")
        }
        guard var bytes = try? JSONEncoder().encode(answer) else { return }
        bytes.append(UInt8(ascii: "\n"))
        _ = try? bytes.withUnsafeBytes { try writeAll($0, to: client, what: "the control socket", startingAt: 0) }
    }

    /// Runs one command line against the served pool; its output and exit status.
    func run(_ arguments: [String]) -> ControlAnswer {
        guard let name = arguments.first, controlCommands.contains(name) else {
            let what = arguments.first.map { "`\(oneLine($0))`" } ?? "an empty command"
            return ControlAnswer(status: 64, stdout: "", stderr: "logpool: error: \(what) does not run through the control socket\n")
        }
        log("control socket: \(arguments.map(oneLine).joined(separator: " "))")
        ServedPool.set(pool)
        defer { ServedPool.set(nil) }
        let result = OutputCapture.capturing { runCommand(LogPoolCommand.self, name: "logpool", arguments: arguments) }
        return ControlAnswer(status: result.status, stdout: String(decoding: result.stdout, as: UTF8.self),
                             stderr: String(decoding: result.stderr, as: UTF8.self))
    }

    /// Stops accepting (a command running finishes first) and removes the socket.
    func stop() {
        stopping.withLock { $0 = true }
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        done.wait()
        unlink(path)
    }
}
