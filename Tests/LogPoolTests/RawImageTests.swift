import Foundation
@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Volume extents (`logpool map`) and sparse raw export/import (issue 10, "data in and out").
@Suite("Extents and raw images")
struct RawImageTests {
    static func tempFile(_ name: String) -> String {
        let dir = NSTemporaryDirectory() + "logpool-raw-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir + "/" + name
    }

    /// A block of non-zero bytes drawn from `g`.
    static func block(_ g: inout SeededGenerator, size: Int = 4096) -> [UInt8] {
        (0..<size).map { _ in UInt8.random(in: 1...255, using: &g) }
    }

    /// The runs a set of mapped block indexes makes over `blocks` blocks.
    static func runs(_ mapped: Set<Int>, blocks: Int, bs: UInt64) -> [VolumeExtent] {
        var result: [VolumeExtent] = []
        for b in 0..<blocks {
            let m = mapped.contains(b)
            if let last = result.last, last.isMapped == m {
                result[result.count - 1].length += bs
            } else {
                result.append(VolumeExtent(offset: UInt64(b) * bs, length: bs, isMapped: m))
            }
        }
        return result
    }

    @Test("extents equal the mapped blocks after seeded writes and discards, through two map levels", arguments: [1, 2, 3] as [UInt64])
    func extentsMatchModel(seed: UInt64) throws {
        let device = SimulatedDevice(byteCount: 32 << 20)
        let pool = try Pool.create(on: device, capacity: 32 << 20, segmentSize: 1 << 20)
        // 64 MiB thin: more than one map leaf, so interior nodes and absent subtrees count.
        let blocks = 16384
        let volume = try pool.createVolume(name: "v", size: UInt64(blocks) * 4096)
        var g = SeededGenerator(seed: seed)
        var mapped = Set<Int>()
        for _ in 0..<300 {
            let b = Int.random(in: 0..<blocks, using: &g)
            let n = min(Int.random(in: 1...8, using: &g), blocks - b)
            if Int.random(in: 0..<4, using: &g) == 0 {
                try volume.discard(at: UInt64(b) * 4096, length: UInt64(n) * 4096)
                for i in b..<b + n { mapped.remove(i) }
            } else {
                var bytes: [UInt8] = []
                for _ in 0..<n { bytes += Self.block(&g) }
                try volume.write(at: UInt64(b) * 4096, from: bytes)
                for i in b..<b + n { mapped.insert(i) }
            }
        }
        let expected = Self.runs(mapped, blocks: blocks, bs: 4096)
        #expect(try volume.extents() == expected, "seed \(seed)")
        // Any byte range (unaligned too): the same runs clipped to it.
        for _ in 0..<50 {
            let start = UInt64.random(in: 0..<(UInt64(blocks) * 4096), using: &g)
            let end = UInt64.random(in: (start + 1)...(UInt64(blocks) * 4096), using: &g)
            let clipped = expected.compactMap { e -> VolumeExtent? in
                let s = max(e.offset, start), t = min(e.offset + e.length, end)
                return t > s ? VolumeExtent(offset: s, length: t - s, isMapped: e.isMapped) : nil
            }
            #expect(try volume.extents(in: start..<end) == clipped, "seed \(seed), range \(start)..<\(end)")
        }
        #expect(throws: PoolError.self) { try volume.extents(in: 0..<(UInt64(blocks) * 4096 + 1)) }
        // A snapshot maps the same blocks; a fresh volume is one hole.
        let snapshot = try pool.snapshot(source: "v", name: "s")
        #expect(try snapshot.extents() == expected, "seed \(seed)")
        let empty = try pool.createVolume(name: "e", size: 8 << 20)
        #expect(try empty.extents() == [VolumeExtent(offset: 0, length: 8 << 20, isMapped: false)])
    }

    @Test("export writes a sparse image of the volume's size; import maps only non-zero blocks and round-trips")
    func exportImportRoundTrip() throws {
        let path = Self.tempFile("pool")
        let pool = try Pool.create(at: path, capacity: 64 << 20, segmentSize: 1 << 20, compression: .lz4)
        defer { try? pool.close() }
        let volume = try pool.createVolume(name: "v", size: 32 << 20)
        var g = SeededGenerator(seed: 9)
        try volume.write(at: 0, from: Self.block(&g, size: 8192))
        try volume.write(at: 20 << 20, from: Self.block(&g, size: 65536))
        try volume.write(at: (32 << 20) - 4096, from: Self.block(&g))
        let image = Self.tempFile("v.raw")
        let fd = open(image, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        #expect(fd >= 0)
        let mapped = try volume.exportRaw(to: fd, sparse: true)
        close(fd)
        #expect(mapped == 8192 + 65536 + 4096)
        var info = stat()
        #expect(stat(image, &info) == 0)
        #expect(info.st_size == 32 << 20)
        // Holes stay holes: the file takes about the mapped bytes (filesystem blocks).
        #expect(UInt64(info.st_blocks) * 512 <= mapped + 64 * 1024, "allocated \(info.st_blocks * 512) for \(mapped) mapped")
        // Byte-exact against the volume.
        let bytes = try Array(Data(contentsOf: URL(fileURLWithPath: image)))
        let exact = bytes == (try volume.read(at: 0, length: 32 << 20))
        #expect(exact, "the image equals the volume byte for byte")

        let input = open(image, O_RDONLY)
        defer { close(input) }
        let written = try pool.importRaw(from: input, name: "w", size: 32 << 20)
        #expect(written == mapped)
        let imported = try pool.openVolume(name: "w")
        #expect(try imported.extents() == (try volume.extents()))
        let importedExact = try imported.read(at: 0, length: 32 << 20) == bytes
        #expect(importedExact, "the imported volume reads back the image")
    }

    @Test("a 1 GiB sparse file with one written block imports as one mapped block, without reading its holes")
    func sparseImport() throws {
        let path = Self.tempFile("pool")
        let pool = try Pool.create(at: path, capacity: 32 << 20, segmentSize: 1 << 20)
        defer { try? pool.close() }
        let image = Self.tempFile("sparse.raw")
        let fd = open(image, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        defer { close(fd) }
        #expect(ftruncate(fd, 1 << 30) == 0)
        var g = SeededGenerator(seed: 3)
        let data = Self.block(&g)
        #expect(data.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, 700 << 20) } == 4096)
        var reported: [UInt64] = []
        let written = try pool.importRaw(from: fd, name: "big", size: 1 << 30) { reported.append($0) }
        #expect(written == 4096)
        let volume = try pool.openVolume(name: "big")
        #expect(try volume.info().mappedBytes == 4096)
        let blockBack = try volume.read(at: 700 << 20, length: 4096) == data
        #expect(blockBack)
        // Holes were skipped by seeking: far fewer chunks than 1 GiB / 1 MiB were read.
        #expect(reported.count < 64, "\(reported.count) progress steps")
    }

    @Test("a failing import (pool full, input longer than the volume) leaves no volume behind")
    func failedImportLeavesPoolUnchanged() throws {
        let path = Self.tempFile("pool")
        let pool = try Pool.create(at: path, capacity: 16 << 20, segmentSize: 1 << 20)
        defer { try? pool.close() }
        let image = Self.tempFile("random.raw")
        var g = SeededGenerator(seed: 5)
        // 32 MiB of incompressible blocks.
        var bytes = [UInt8](repeating: 0, count: 32 << 20)
        bytes.withUnsafeMutableBytes { raw in
            for i in stride(from: 0, to: raw.count, by: 8) { raw.storeBytes(of: g.next() | 1, toByteOffset: i, as: UInt64.self) }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: image))
        let fd = open(image, O_RDONLY)
        defer { close(fd) }
        #expect(throws: PoolError.self) { try pool.importRaw(from: fd, name: "big", size: 32 << 20) }
        #expect(throws: PoolError.self) { try pool.openVolume(name: "big") }
        #expect(pool.stats.volumeCount == 0)

        // From a pipe: more bytes than the volume holds is refused, and the volume removed.
        signal(SIGPIPE, SIG_IGN)
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        let writer = fds[1]
        let feeder = Thread {
            let chunk = [UInt8](repeating: 7, count: 4096)
            for _ in 0..<3 { _ = chunk.withUnsafeBytes { write(writer, $0.baseAddress, 4096) } }
            close(writer)
        }
        feeder.start()
        #expect(throws: PoolError.self) { try pool.importRaw(from: fds[0], name: "p", size: 8192) }
        close(fds[0])
        #expect(pool.stats.volumeCount == 0)
    }
}
