import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit

#if canImport(Glibc)
import Glibc
#endif

/// A device that counts the bytes written through it: device write amplification is
/// what the process wrote to the pool file over what the user wrote.
final class CountingDevice: BlockDevice {
    let base: BlockDevice
    private(set) var writtenByteCount: UInt64 = 0

    init(_ base: BlockDevice) { self.base = base }

    func byteCount() throws -> UInt64 { try base.byteCount() }
    func read(into buffer: UnsafeMutableRawBufferPointer, at byteOffset: UInt64) throws { try base.read(into: buffer, at: byteOffset) }
    func write(_ bytes: UnsafeRawBufferPointer, at byteOffset: UInt64) throws {
        try base.write(bytes, at: byteOffset)
        writtenByteCount += UInt64(bytes.count)
    }
    func sync() throws { try base.sync() }
}

/// The overwrite section of `logpool bench` (issue 14): a pool filled to 50, 80, 90 and
/// 95%, then overwritten with random 4 KiB writes (sync every 32), uniform and 90/10,
/// uncompressed random data and LZ4 with varying sizes.
extension Bench {
    struct OverwriteRow: Encodable {
        var compression: String
        var fullPercent: Int
        var pattern: String
        /// Bytes written to the pool file / data bytes the user wrote, as stored.
        var deviceWA: Double
        /// (user data + data compaction moved) / user data, as stored.
        var dataWA: Double
        /// Overwrite MB/s (logical) over the fill phase's MB/s, same pool, same run.
        var throughputRatio: Double
        var p99WriteMicroseconds: Double
        var poolFullCount: Int
        /// Of those, refused by A-1 (live data fills the pool: an overwrite whose LZ4
        /// size grew) rather than A-2 (room compaction could not gather).
        var logicalPoolFullCount: Int
        /// Checkpoints during the overwrite phase (superblock generations): each writes
        /// the dirty metadata pages, the main cost beyond data when compaction runs often.
        var checkpointCount: UInt64
        var target: String
    }

    /// A 4 KiB block: random bytes, or for `varying` a random 1-4 KiB prefix then zeros
    /// (LZ4 sizes then vary from block to block).
    static func overwriteBlock(_ g: inout SplitMix, varying: Bool, into block: inout [UInt8]) {
        let prefix = varying ? Int(1024 + g.next() % 3073) / 8 * 8 : 4096
        block.withUnsafeMutableBytes { raw in
            for i in stride(from: 0, to: prefix, by: 8) { raw.storeBytes(of: g.next(), toByteOffset: i, as: UInt64.self) }
            if prefix < 4096 { UnsafeMutableRawBufferPointer(rebasing: raw[prefix...]).initializeMemory(as: UInt8.self, repeating: 0) }
        }
    }

    func overwriteRows(directory: String, poolMiB: Int, passes: Int) throws -> [OverwriteRow] {
        var rows: [OverwriteRow] = []
        for (mode, varying) in [(CompressionMode.none, false), (CompressionMode.lz4, true)] {
            for full in [50, 80, 90, 95] {
                for hot in [false, true] {
                    rows.append(try overwriteRow(directory: directory, poolMiB: poolMiB, passes: passes, mode: mode,
                                                 varying: varying, fullPercent: full, hot: hot))
                }
            }
        }
        return rows
    }

    private func overwriteRow(directory: String, poolMiB: Int, passes: Int, mode: CompressionMode, varying: Bool,
                              fullPercent: Int, hot: Bool) throws -> OverwriteRow {
        let path = directory + "/logpool-bench-overwrite-\(getpid()).pool"
        unlink(path)
        defer { unlink(path) }
        let capacity = UInt64(poolMiB) << 20
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0o644)
        guard fd >= 0 else { throw PoolError.io(errno: errno, operation: "create \(path)", byteOffset: 0) }
        let truncated = ftruncate(fd, off_t(capacity))
        close(fd)
        guard truncated == 0 else { throw PoolError.io(errno: errno, operation: "ftruncate \(path)", byteOffset: 0) }
        let device = CountingDevice(try FileDevice(path: path, mode: .readWrite))
        let pool = try Pool.create(on: device, capacity: capacity, segmentSize: 1 << 20, compression: mode)
        let target = pool.stats.unwrittenBytes * UInt64(fullPercent) / 100
        // Big enough that the pool fills before the volume does, whatever LZ4 gets.
        let volume = try pool.createVolume(name: "v", size: capacity * 4)
        var g = SplitMix(seed: UInt64(fullPercent * 10 + (hot ? 1 : 0)))
        var block = [UInt8](repeating: 0, count: 4096)

        // Fill front to back in 1 MiB writes until the pool holds `target` live bytes.
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var filled: UInt64 = 0
        settle()
        var t0 = now()
        while pool.stats.usedBytes < target {
            for i in 0..<256 {
                Bench.overwriteBlock(&g, varying: varying, into: &block)
                chunk.withUnsafeMutableBytes { raw in
                    block.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: raw[(i * 4096)..<((i + 1) * 4096)]).copyMemory(from: $0) }
                }
            }
            try volume.write(at: filled, from: chunk)
            filled += UInt64(chunk.count)
        }
        try pool.sync()
        let fillRate = Double(filled) / (now() - t0)

        // Overwrite: `passes` times the filled blocks, 4 KiB each, sync every 32.
        let blocks = filled / 4096
        let writes = Int(blocks) * passes
        let before = pool.stats
        let deviceBefore = device.writtenByteCount
        var latencies: [Double] = []
        latencies.reserveCapacity(writes)
        var poolFulls = 0, logical = 0
        settle()
        t0 = now()
        for i in 0..<writes {
            let index: UInt64
            if hot {
                // 90% of the writes to the first tenth of the blocks.
                let hotBlocks = max(1, blocks / 10)
                index = g.next() % 10 < 9 ? g.next() % hotBlocks : g.next() % blocks
            } else {
                index = g.next() % blocks
            }
            Bench.overwriteBlock(&g, varying: varying, into: &block)
            let start = now()
            do {
                try volume.write(at: index * 4096, from: block)
            } catch PoolError.poolFull(_, _, let figures) {
                poolFulls += 1
                if figures.rule == .logical { logical += 1 }
            }
            latencies.append(now() - start)
            if i % 32 == 31 { try pool.sync() }
        }
        try pool.sync()
        let overwriteRate = Double(writes * 4096) / (now() - t0)
        let after = pool.stats
        let user = Double(after.writtenDataBytes - before.writtenDataBytes)
        let moved = Double(after.movedDataBytes - before.movedDataBytes)
        let deviceBytes = Double(device.writtenByteCount - deviceBefore)
        try pool.close()
        latencies.sort()
        let p99 = latencies.isEmpty ? 0 : latencies[min(latencies.count - 1, latencies.count * 99 / 100)] * 1e6
        return OverwriteRow(compression: varying ? "lz4-varying" : mode.description, fullPercent: fullPercent,
                            pattern: hot ? "90/10" : "uniform", deviceWA: deviceBytes / max(user, 1),
                            dataWA: (user + moved) / max(user, 1), throughputRatio: overwriteRate / fillRate,
                            p99WriteMicroseconds: p99, poolFullCount: poolFulls, logicalPoolFullCount: logical,
                            checkpointCount: after.generation - before.generation,
                            target: mode == .none ? "0 poolFull, device WA <= 1.1" : "0 poolFull, device WA <= 1.3")
    }

    func printOverwriteTable(_ rows: [OverwriteRow]) throws {
        var table = [["COMPRESSION", "FULL", "PATTERN", "DEVICE-WA", "DATA-WA", "TPUT/FILL", "P99-US", "CKPTS", "POOLFULL", "TARGET"]]
        for r in rows {
            table.append([r.compression, "\(r.fullPercent)%", r.pattern, String(format: "%.2f", r.deviceWA),
                          String(format: "%.2f", r.dataWA), String(format: "%.3f", r.throughputRatio),
                          String(format: "%.0f", r.p99WriteMicroseconds), "\(r.checkpointCount)",
                          r.poolFullCount == 0 ? "0" : "\(r.poolFullCount) (\(r.logicalPoolFullCount) A-1)", r.target])
        }
        try printTable(table)
    }
}
