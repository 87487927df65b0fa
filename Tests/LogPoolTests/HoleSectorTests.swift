import Foundation
@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

@Suite("Hole reuse and physical sectors")
struct HoleSectorTests {
    @Test("compressed writes into holes never rewrite a synced 4 KiB sector")
    func compressedHoleFillKeepsSyncedSectors() throws {
        let capacity = 16 << 20
        let device = SimulatedDevice(byteCount: capacity)
        let pool = try Pool.create(on: device, capacity: UInt64(capacity), segmentSize: 1 << 20, compression: .lz4)
        var g = SeededGenerator(seed: 7)
        func block() -> [UInt8] {
            var bytes = [UInt8](repeating: 0, count: 4096)
            let prefix = Int.random(in: 1024...4096, using: &g) / 8 * 8
            for i in 0..<prefix { bytes[i] = UInt8.random(in: 0...255, using: &g) }
            return bytes
        }
        let volume = try pool.createVolume(name: "v", size: UInt64(capacity) * 2)
        var blocks = 0
        let target = pool.stats.unwrittenBytes * 85 / 100
        while pool.stats.usedBytes < target {
            try volume.write(at: UInt64(blocks) * 4096, from: block())
            blocks += 1
        }
        try pool.sync()
        let checks = WriteChecks(physicalSectorByteCount: 4096)
        var violations: [String] = []
        checks.onViolation = { name, detail in if violations.count < 3 { violations.append("\(name): \(detail)") } }
        checks.attach(to: device)
        for i in 0..<1500 {
            do {
                try volume.write(at: UInt64(Int.random(in: 0..<blocks, using: &g)) * 4096, from: block())
            } catch PoolError.poolFull(_, _, let figures) where figures.rule == .logical {
                // An overwrite whose LZ4 size grew on a pool full of live data.
            }
            if i % 8 == 7 { try pool.sync() }
            if !violations.isEmpty { break }
        }
        #expect(violations.isEmpty, "\(violations)")
    }
}
