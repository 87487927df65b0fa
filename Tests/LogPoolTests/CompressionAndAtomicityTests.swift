import Foundation
import LogPool
import LogPoolTesting
import Testing

@Suite("Compression and atomic writes", .strictVerify)
struct CompressionAndAtomicityTests {
    @Test("a block is stored compressed only when that saves a sector")
    func compressionRule() throws {
        let (pool, device) = try makePool(compression: .lz4)
        let v = try pool.createVolume(name: "v", size: 64 * 4096)
        var generator = SeededGenerator(seed: 5)
        let random = (0..<(16 * 4096)).map { _ in UInt8.random(in: 0...255, using: &generator) }
        try v.write(at: 0, from: random)
        #expect(try v.info().allocatedBytes == 16 * 4096, "incompressible blocks must be stored as they are")
        let zeros = [UInt8](repeating: 0, count: 16 * 4096)
        try v.write(at: 16 * 4096, from: zeros)
        let text = Array(String(repeating: "abcdefgh", count: 16 * 512).utf8)
        try v.write(at: 32 * 4096, from: text)
        let info = try v.info()
        #expect(info.allocatedBytes == 16 * 4096 + 32 * 512, "compressible blocks take one sector each, got \(info.allocatedBytes)")
        #expect(try v.read(at: 0, length: random.count) == random)
        #expect(try v.read(at: 16 * 4096, length: zeros.count) == zeros)
        #expect(try v.read(at: 32 * 4096, length: text.count) == text)
        // Through sync and reopen, and a partial read of a compressed block.
        try pool.sync()
        let (reopened, _) = try reopen(device)
        #expect(try reopened.openVolume(name: "v").read(at: 32 * 4096 + 100, length: 50) == Array(text[100..<150]))
    }

    /// Goal: a single write of up to 1 MiB is atomic across a crash (promise 2). Method:
    /// an unaligned 1 MiB write over existing data, then every crash image of its sync
    /// (prefixes, tears, omissions, subsets) must read back wholly old or wholly new.
    @Test("a 1 MiB write is wholly present or wholly absent after any crash", arguments: [UInt64(1), 2])
    func atomicMegabyte(seed: UInt64) throws {
        let (pool, device) = try makePool(capacity: 16 << 20, segmentSize: 256 << 10, compression: seed == 2 ? .lz4 : .none)
        let v = try pool.createVolume(name: "v", size: 2 << 20)
        let old = pattern(2 << 20, seed: 1)
        try v.write(at: 0, from: old)
        // A checkpoint, not just a sync: media damage (C7) to a batch synced before the
        // simulator attached would be the unprovable newest batch (FORMAT J-7).
        try pool.checkpoint()
        var new = old
        let data = pattern(1 << 20, seed: 9)
        new.replaceSubrange(1234..<(1234 + (1 << 20)), with: data)
        var expectedOld = ReferenceModel(), expectedNew = ReferenceModel()
        expectedOld.volumes["v"] = .init(bytes: old, isSnapshot: false, origin: nil)
        expectedNew.volumes["v"] = .init(bytes: new, isSnapshot: false, origin: nil)
        let simulator = CrashSimulator(seed: seed, workload: "atomic-1m", initial: expectedOld)
        simulator.opFinished("write 1 MiB at 1234", model: expectedNew)
        simulator.attach(to: device)
        try v.write(at: 1234, from: data)
        try pool.sync()
        simulator.detach(from: device)
        let figures = simulator.figures
        #expect(figures.violations.isEmpty, "\(figures.violations.map(\.description).joined(separator: "\n"))")
        #expect(figures.uniqueTotal >= 5)
    }
}
