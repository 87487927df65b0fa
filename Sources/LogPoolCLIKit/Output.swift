import ArgumentParser
import Foundation
import LogPool
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

// Output plumbing shared by the `logpool` and `logpool-sim` executables: every byte a
// command prints goes through a checked write, and errors are one line on stderr.

/// Control characters (a name or path holding a newline) are escaped so an error stays
/// one line.
package func oneLine(_ message: String) -> String {
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

package struct StandardError: TextOutputStream {
    package init() {}

    /// A closed or full stderr loses the message; it must not crash the command.
    package mutating func write(_ string: String) {
        _ = try? writeAll(Array(string.utf8), to: CommandStreams.error, what: "standard error", startingAt: 0)
    }
}

/// The standard streams and working directory of a command that `logpool serve` runs
/// for a client of its control socket (Specs/SERVE.md §3): the client's own descriptors,
/// passed over the socket, so the command reads the client's stdin, writes the client's
/// stdout and stderr, and resolves relative paths against the client's directory.
package struct ClientStreams: Sendable {
    package var input: Int32
    package var output: Int32
    package var error: Int32
    /// An open descriptor of the client's working directory (for `openat`).
    package var directory: Int32
    /// The client started with stdin closed (it sent /dev/null instead).
    package var inputWasClosed: Bool
    /// The control connection: the client sends nothing after its request, so this is
    /// readable only once the client has gone.
    package var connection: Int32
    /// True once the server is stopping: long commands stop at their next chunk.
    package var stopping: @Sendable () -> Bool
    /// Standard output of this command: the client's, counting its own bytes.
    package let standardOutput: CheckedOutput

    package init(input: Int32, output: Int32, error: Int32, directory: Int32, inputWasClosed: Bool, connection: Int32,
                 stopping: @escaping @Sendable () -> Bool) {
        (self.input, self.output, self.error, self.directory) = (input, output, error, directory)
        self.inputWasClosed = inputWasClosed
        self.connection = connection
        self.stopping = stopping
        standardOutput = CheckedOutput(fd: output, what: "standard output")
    }
}

/// The streams of the command running on this thread: the process's own descriptors
/// 0-2 and working directory, or a control-socket client's (``ClientStreams``) on the
/// threads of `logpool serve` that run its clients' commands. Each command runs on one
/// thread, so the table is keyed by thread; other threads, the server's own log lines
/// among them, keep the process's descriptors.
package enum CommandStreams {
    private static let table = Mutex<[pthread_t: ClientStreams]>([:])

    /// Runs `body` with this thread's streams set to `streams`.
    package static func with<T>(_ streams: ClientStreams, _ body: () throws -> T) rethrows -> T {
        table.withLock { $0[pthread_self()] = streams }
        defer { _ = table.withLock { $0.removeValue(forKey: pthread_self()) } }
        return try body()
    }

    /// The client's streams when this thread runs a control-socket command.
    package static var client: ClientStreams? { table.withLock { $0[pthread_self()] } }

    package static var input: Int32 { client?.input ?? STDIN_FILENO }
    package static var output: Int32 { client?.output ?? STDOUT_FILENO }
    package static var error: Int32 { client?.error ?? STDERR_FILENO }
    /// The directory relative paths are resolved against (`AT_FDCWD`: this process's own).
    package static var directory: Int32 { client?.directory ?? AT_FDCWD }
    package static var inputWasClosed: Bool { client?.inputWasClosed ?? StandardStreams.stdinWasClosed }

    /// Throws when this thread runs a control-socket client's command and that client has
    /// gone (killed, or its connection closed) or the server is stopping, so a long copy
    /// stops instead of writing for nobody. Cheap (one `poll`); call once per chunk.
    package static func checkClient() throws {
        guard let client else { return }
        if client.stopping() { throw ClientGone(reason: "logpool serve is stopping") }
        // POLLRDHUP (0x2000) needs _GNU_SOURCE, which the Glibc module lacks.
        var entry = pollfd(fd: client.connection, events: Int16(POLLIN) | 0x2000, revents: 0)
        if poll(&entry, 1, 0) > 0 && entry.revents != 0 {
            throw ClientGone(reason: "the client closed its control connection")
        }
    }
}

/// A control-socket command stopped because its client went away or the server stops.
package struct ClientGone: ReportedError {
    package var reason: String
    package var description: String { "stopped: \(reason)" }
}

/// Opens `path` as `open(2)` would, relative paths against ``CommandStreams/directory``.
package func openPath(_ path: String, _ flags: Int32, _ mode: mode_t = 0) -> Int32 {
    openat(CommandStreams.directory, path, flags, mode)
}

/// `stat(2)` of `path`, relative paths against ``CommandStreams/directory``.
package func statPath(_ path: String, _ info: inout stat) -> Int32 {
    fstatat(CommandStreams.directory, path, &info, 0)
}

/// Which of descriptors 0-2 were closed when the process started. ``StandardStreams/guardDescriptors()``
/// fills each closed one with /dev/null, so that no file the command opens later (the
/// pool, an output file) takes its number: with stdin closed, the pool would otherwise
/// be opened as descriptor 0 and `write` would copy the pool file into the volume.
package enum StandardStreams {
    package static let closedAtStart: [Bool] = {
        var closed: [Bool] = []
        for fd in Int32(0)...2 {
            let wasClosed = fcntl(fd, F_GETFD) == -1 && errno == EBADF
            if wasClosed {
                let filler = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY)
                if filler >= 0 && filler != fd {
                    // Another descriptor was lower and free (cannot happen in order 0-2,
                    // but never leave the gap open).
                    _ = dup2(filler, fd)
                    close(filler)
                }
            }
            closed.append(wasClosed)
        }
        return closed
    }()

    package static func guardDescriptors() { _ = closedAtStart }

    package static var stdinWasClosed: Bool { closedAtStart[0] }
}

/// Writes every byte of `bytes` to `fd`, retrying on EINTR and short writes. A failure
/// (a full disk, a closed pipe) throws `io` with the real errno and the byte offset the
/// stream had reached.
@discardableResult
package func writeAll(_ bytes: [UInt8], to fd: Int32, what: String, startingAt offset: UInt64) throws -> Int {
    try bytes.withUnsafeBytes { try writeAll($0, to: fd, what: what, startingAt: offset) }
}

@discardableResult
package func writeAll(_ bytes: UnsafeRawBufferPointer, to fd: Int32, what: String, startingAt offset: UInt64) throws -> Int {
    var done = 0
    while done < bytes.count {
        let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
        if n < 0 {
            if errno == EINTR { continue }
            throw PoolError.io(errno: errno, operation: "write to \(what)", byteOffset: offset + UInt64(done))
        }
        done += n
    }
    return done
}

/// An output stream on a descriptor that reports every failed write: nothing is
/// buffered, so the command's exit status and message reflect the write that failed.
package final class CheckedOutput: Sendable {
    package let fd: Int32
    package let what: String
    /// Bytes written so far; the mutex also keeps writes from several threads whole.
    private let byteCount = Mutex<UInt64>(0)

    package init(fd: Int32, what: String) {
        self.fd = fd
        self.what = what
    }

    private static let processStandardOutput = CheckedOutput(fd: STDOUT_FILENO, what: "standard output")

    /// Standard output of the command running on this thread: the process's, or a
    /// control-socket client's (``ClientStreams``).
    package static var standardOutput: CheckedOutput { CommandStreams.client?.standardOutput ?? processStandardOutput }

    package func write(_ bytes: UnsafeRawBufferPointer) throws {
        // The failure is returned out of the mutex's closure and thrown here: nothing is
        // thrown through it.
        let failure: PoolError? = byteCount.withLock { written in
            do {
                written += UInt64(try writeAll(bytes, to: fd, what: what, startingAt: written))
                return nil
            } catch let error as PoolError {
                return error
            } catch {
                return PoolError.io(errno: EIO, operation: "write to \(what): \(error)", byteOffset: written)
            }
        }
        if let failure { throw failure }
    }

    package func write(_ text: String) throws {
        let bytes = Array(text.utf8)
        try bytes.withUnsafeBytes { try write($0) }
    }
}

/// Prints one line (or `text` with `terminator`) to standard output, throwing when the
/// write fails.
package func out(_ text: String = "", terminator: String = "\n") throws {
    try CheckedOutput.standardOutput.write(text + terminator)
}

package func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    var data = try encoder.encode(value)
    data.append(contentsOf: Array("\n".utf8))
    try data.withUnsafeBytes { try CheckedOutput.standardOutput.write($0) }
}

/// An error a command reports as its own one-line message (exit status 1).
package protocol ReportedError: Error, CustomStringConvertible {}

extension PoolError: ReportedError {}

/// The `main` of both executables: guards descriptors 0-2 before anything is opened,
/// refuses arguments that are not UTF-8 and `help` of an unknown command (usage errors,
/// 64), runs the command, and prints any error as one line `NAME: error: ...` (1 for
/// an error the pool or command reported, 64 for usage errors).
///
/// `movedCommands` maps a command that lives elsewhere now to where (named in the error).
package func runMain<Root: ParsableCommand>(_ root: Root.Type, name: String, movedCommands: [String: String] = [:]) -> Never {
    StandardStreams.guardDescriptors()
    var err = StandardError()
    let arguments = CommandLine.arguments
    // An unknown command, or `help` of one, is a usage error (ArgumentParser would print
    // the root help and exit 0 for `help NAME` or `NAME --help`, hiding the typo).
    let names = root.configuration.subcommands.map { $0._commandName } + ["help"]
    let asked = arguments.count >= 3 && arguments[1] == "help" ? arguments[2] : (arguments.count >= 2 ? arguments[1] : "")
    if !asked.isEmpty, !asked.hasPrefix("-"), !names.contains(asked) {
        let hint = movedCommands[asked].map { "; it is now `\($0)`" } ?? ""
        print("\(name): error: no such command: \(oneLine(asked))\(hint) (see \(name) --help)", to: &err)
        exit(64)
    }
    for i in 1..<Int(CommandLine.argc) {
        // Swift would map bad bytes to U+FFFD, so two different byte strings would name
        // one volume.
        guard let raw = CommandLine.unsafeArgv[i], String(validatingCString: raw) == nil else { continue }
        print("\(name): error: argument \(i) is not valid UTF-8 (names and paths must be UTF-8)", to: &err)
        exit(64)
    }
    exit(runCommand(root, name: name, arguments: nil))
}

/// Parses `arguments` (nil: the process's own) as a command of `root`, runs it, prints
/// any error as one line on stderr, and returns the exit status: 0, the status the
/// command chose, 1 for an error the pool or command reported, 64 for usage errors.
package func runCommand<Root: ParsableCommand>(_ root: Root.Type, name: String, arguments: [String]?) -> Int32 {
    var err = StandardError()
    do {
        var command = try root.parseAsRoot(arguments)
        try command.run()
        return 0
    } catch let code as ExitCode {
        // A status the command chose after saying why itself (crashsim's violations,
        // torture's signal).
        return code.rawValue
    } catch let error as any ReportedError {
        print("\(name): error: \(oneLine(error.description))", to: &err)
        return 1
    } catch {
        let code = root.exitCode(for: error)
        if code == .success {
            // --help and --version: printed through the checked writer, so a full or
            // closed stdout is an error here too.
            do {
                try out(root.fullMessage(for: error))
            } catch {
                print("\(name): error: \(oneLine("\(error)"))", to: &err)
                return 1
            }
            return 0
        }
        let message = root.message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
        let trimmed = message.hasPrefix("Error: ") ? String(message.dropFirst(7)) : message
        if !trimmed.isEmpty { print("\(name): error: \(oneLine(trimmed))", to: &err) }
        return code.rawValue == 0 ? 1 : code.rawValue
    }
}

/// Unblocks SIGTERM and SIGINT in the calling thread (call it from the main thread before
/// catching them). A process inherits its signal mask from the thread that spawned it,
/// and a parent that spawns from a dispatch worker thread (which blocks signals) hands
/// down a mask with both blocked: a SIGTERM then stays pending for good and the process
/// runs on (seen as `logpool-sim torture` ignoring SIGTERM under `swift test`).
package func unblockTerminationSignals() {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGTERM)
    sigaddset(&set, SIGINT)
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
}
