import Foundation
import LogPool
import NIOCore
import NIOPosix
import Synchronization

/// Serves a pool's volumes to NBD clients (Specs/SERVE.md): one export per volume or
/// snapshot, named after it; snapshots (and everything, with `readOnly`) read-only.
///
/// Networking runs on SwiftNIO event loops; every engine call (which takes the pool's lock
/// and may fsync) runs on a thread pool, so a sync never stalls the loops and requests on
/// one connection complete out of order.
public final class NBDServer: Sendable {
    public let pool: Pool
    /// Volume names to serve; nil serves every volume and snapshot.
    public let exportNames: [String]?
    public let readOnly: Bool
    let group: MultiThreadedEventLoopGroup
    /// Threads that run engine calls (the event loops never block on the pool).
    static let workerCount = 4
    let threadPool: NIOThreadPool
    let log: @Sendable (String) -> Void
    private let channels = Mutex<[Channel]>([])

    /// - Parameters:
    ///   - log: called with one line per connection and per error.
    public init(pool: Pool, exportNames: [String]? = nil, readOnly: Bool = false, log: @escaping @Sendable (String) -> Void) {
        self.pool = pool
        self.exportNames = exportNames
        self.readOnly = readOnly || pool.isReadOnly
        self.log = log
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        threadPool = NIOThreadPool(numberOfThreads: Self.workerCount)
        threadPool.start()
    }

    /// The names clients may ask for.
    func exports() throws -> [String] {
        let all = try pool.list().map(\.name)
        guard let exportNames else { return all }
        return exportNames.filter { all.contains($0) }
    }

    /// Opens export `name`, or nil when it is not served. A name lookup, not a listing
    /// (``exports()`` computes every volume's space figures, a walk of every map).
    func volume(named name: String) throws -> Volume? {
        if let exportNames, !exportNames.contains(name) { return nil }
        do {
            return try pool.openVolume(name: name)
        } catch PoolError.notFound {
            return nil
        }
    }

    /// Export `name` as a client is served it, or nil when it is not served.
    func openExport(_ name: String) throws -> NBDConnection.Export? {
        guard let volume = try volume(named: name) else { return nil }
        return NBDConnection.Export(name: name, volume: volume, size: volume.size, readOnly: readOnly || volume.isReadOnly)
    }

    private func bootstrap() -> ServerBootstrap {
        ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NBDConnection(server: self))
                }
            }
    }

    /// Listens on a Unix socket at `path` (an existing socket file there is replaced).
    public func listen(unixSocket path: String) throws {
        let channel = try bootstrap().bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait()
        channels.withLock { $0.append(channel) }
        log("listening on unix socket \(path)")
    }

    /// Listens on TCP `host`:`port`; returns the port bound (for port 0).
    @discardableResult
    public func listen(host: String, port: Int) throws -> Int {
        let channel = try bootstrap().bind(host: host, port: port).wait()
        channels.withLock { $0.append(channel) }
        let bound = channel.localAddress?.port ?? port
        log("listening on \(host):\(bound)")
        return bound
    }

    /// Stops accepting, lets requests in flight finish, then stops the loops and the
    /// thread pool. The pool stays open: the caller syncs and closes it.
    public func shutdown() throws {
        let listening = channels.withLock { channels in
            defer { channels = [] }
            return channels
        }
        for channel in listening { try? channel.close().wait() }
        try threadPool.syncShutdownGracefully()
        try group.syncShutdownGracefully()
    }
}

/// Maps an engine error to the NBD error a client sees (Specs/SERVE.md).
func nbdError(_ error: Error) -> UInt32 {
    switch error {
    case PoolError.poolFull: return NBD.enospc
    case PoolError.readOnly: return NBD.eperm
    case PoolError.outOfRange, PoolError.invalidArgument: return NBD.einval
    case PoolError.closed: return NBD.eshutdown
    case is NIOThreadPoolError.ThreadPoolInactive: return NBD.eshutdown
    default: return NBD.eio
    }
}
