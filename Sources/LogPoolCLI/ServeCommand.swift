import ArgumentParser
import Dispatch
import Foundation
import LogPool
import LogPoolCLIKit
import LogPoolServe

#if canImport(Glibc)
import Glibc
#endif

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve volumes to NBD clients (qemu-img, qemu-nbd, nbdfuse, the kernel's nbd).",
        discussion: """
            Holds the pool open for writing and serves each volume and snapshot as an NBD export \
            named after it (snapshots read-only). --socket serves on a Unix socket \
            (nbd+unix:///NAME?socket=PATH), --listen on TCP (nbd://HOST:PORT/NAME; port 10809 \
            when none is given). While it runs, every command on the pool but scrub (info, list, \
            create, snapshot, clone, destroy, rename, resize, compact, sync, map, discard, verify, \
            read, write, export, import) reaches it through its control socket, POOL.control, \
            and runs in the server with the client's stdin, stdout, stderr and directory; only \
            the pool file's owner may use it. One line per connection and per error goes to stderr. SIGINT \
            or SIGTERM stops accepting, lets requests in flight finish, syncs and closes the \
            pool cleanly, and exits 0.
            """)
    @Argument(help: "Path of the pool file.") var pool: String
    @Option(help: "Serve NBD on this Unix socket path (an old socket file there is replaced).") var socket: String?
    @Option(help: "Serve NBD on TCP HOST[:PORT] (default port 10809); may be repeated.") var listen: [String] = []
    @Flag(help: "Refuse every write (exports are read-only).") var readOnly = false
    @Option(help: "Serve only this volume or snapshot; may be repeated (default: all).") var export: [String] = []

    static let defaultPort = 10809

    func validate() throws {
        if socket == nil && listen.isEmpty { throw ValidationError("give --socket PATH or --listen HOST[:PORT]") }
        for address in listen { _ = try Serve.parse(address) }
    }

    /// HOST[:PORT], with [IPv6]:PORT.
    static func parse(_ address: String) throws -> (String, Int) {
        var host = Substring(address), port = defaultPort
        if host.hasPrefix("["), let close = host.firstIndex(of: "]") {
            let rest = host[host.index(after: close)...]
            host = host[host.index(after: host.startIndex)..<close]
            if rest.hasPrefix(":") {
                guard let p = Int(rest.dropFirst()), (0...65535).contains(p) else { throw ValidationError("bad port in --listen \(address)") }
                port = p
            } else if !rest.isEmpty {
                throw ValidationError("bad --listen \(address): expected [HOST]:PORT")
            }
        } else if let colon = host.lastIndex(of: ":"), host.firstIndex(of: ":") == colon {
            guard let p = Int(host[host.index(after: colon)...]), (0...65535).contains(p) else { throw ValidationError("bad port in --listen \(address)") }
            port = p
            host = host[..<colon]
        }
        guard !host.isEmpty else { throw ValidationError("bad --listen \(address): no host") }
        return (String(host), port)
    }

    func run() throws {
        // A client that goes away must not kill the server: writes to its closed socket
        // or pipe fail with EPIPE instead.
        signal(SIGPIPE, SIG_IGN)
        let opened = try Pool.open(at: pool, mode: readOnly ? .readOnly : .readWrite)
        let names = try opened.list().map(\.name)
        for name in export where !names.contains(name) {
            try? opened.close()
            throw PoolError.notFound("no volume or snapshot named \(oneLine(name))")
        }
        let server = NBDServer(pool: opened, exportNames: export.isEmpty ? nil : export, readOnly: readOnly) { line in
            var err = StandardError()
            print("logpool serve: \(line)", to: &err)
        }
        let control: ControlServer
        do {
            control = try ControlServer(path: controlSocketPath(forPool: pool), poolPath: pool, pool: opened) { line in
                var err = StandardError()
                print("logpool serve: \(line)", to: &err)
            }
        } catch {
            try? server.shutdown()
            try? opened.close()
            throw error
        }
        do {
            if let socket { try server.listen(unixSocket: socket) }
            for address in listen {
                let (host, port) = try Serve.parse(address)
                try server.listen(host: host, port: port)
            }
        } catch {
            control.stop()
            try? server.shutdown()
            try? opened.close()
            throw error
        }
        // Wait for SIGINT or SIGTERM.
        let stop = DispatchSemaphore(value: 0)
        var sources: [DispatchSourceSignal] = []
        unblockTerminationSignals()
        for signalNumber in [SIGINT, SIGTERM] {
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
            source.setEventHandler { stop.signal() }
            source.resume()
            sources.append(source)
        }
        stop.wait()
        var err = StandardError()
        print("logpool serve: stopping: finishing requests in flight, then syncing and closing the pool", to: &err)
        control.stop()
        try server.shutdown()
        if let socket { unlink(socket) }
        try opened.close()
        print("logpool serve: pool closed cleanly", to: &err)
        _ = sources
    }
}
