import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit

/// The main job in one command: a pool, a volume, writes, a snapshot, a clone, and
/// the space figures after each step.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a short demo in a fresh 256 MiB pool file.",
        discussion: "Without --dir the pool lives in a temporary directory that is removed at the end; with --dir the pool file is kept there and the demo says so.")
    @Option(help: "Keep the demo pool (256 MiB, sparse) in this directory as demo.pool (default: a temporary directory, removed at the end).")
    var dir: String?

    func run() throws {
        let temporary = dir == nil
        let directory = dir ?? (NSTemporaryDirectory() + "logpool-demo-\(getpid())")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = directory + "/demo.pool"
        defer { if temporary { try? FileManager.default.removeItem(atPath: directory) } }
        guard !FileManager.default.fileExists(atPath: path) else {
            throw PoolError.exists("\(path) (remove it, or give another --dir)")
        }
        try out("== logpool init \(path) --size 256M")
        let pool = try Pool.create(at: path, capacity: 256 << 20)
        try out("== create volume 'disk' of 64 MiB and write 16 MiB of text")
        let disk = try pool.createVolume(name: "disk", size: 64 << 20)
        let line = Array("LogPool: snapshots stay intact when the pool is full.\n".utf8)
        var chunk: [UInt8] = []
        while chunk.count < 1 << 20 { chunk += line }
        chunk = Array(chunk.prefix(1 << 20))
        for i in 0..<16 { try disk.write(at: UInt64(i) << 20, from: chunk) }
        try pool.sync()
        try out("== snapshot disk -> disk@1, then overwrite 1 MiB of disk")
        try pool.snapshot(source: "disk", name: "disk@1")
        try disk.write(at: 0, from: [UInt8](repeating: 0x42, count: 1 << 20))
        try out("== clone disk@1 -> dev, write 4 KiB into dev")
        let dev = try pool.clone(source: "disk@1", name: "dev")
        try dev.write(at: 4096, from: Array(repeating: 0x7A, count: 4096))
        try pool.sync()
        let snapFirst = try pool.openVolume(name: "disk@1").read(at: 0, length: line.count)
        try out("disk@1 still reads: \(String(decoding: snapFirst, as: UTF8.self).trimmingCharacters(in: .newlines))")
        try out("disk now reads 0x\(String(try disk.read(at: 0, length: 1)[0], radix: 16)) at offset 0")
        try out()
        try printVolumeTable(try pool.list())
        let s = pool.stats
        try out()
        try printTable([
            ["pool capacity", formatBytes(s.capacityBytes)],
            ["used (lz4 compressed)", formatBytes(s.usedBytes)],
            ["dead", formatBytes(s.deadBytes)],
            ["free", formatBytes(s.freeBytes)],
            ["reserve", formatBytes(s.reserveBytes)],
        ])
        try pool.close()
        if temporary {
            try out("\n(the demo pool was in a temporary directory and is removed; give --dir DIR to keep it)")
        } else {
            try out("\npool kept at \(path) (256 MiB sparse file); try: logpool info \(path); remove it with: rm \(path)")
        }
    }
}
