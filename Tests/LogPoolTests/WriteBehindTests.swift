@testable import LogPool
import LogPoolTesting
import Testing

/// The write-behind thread (Specs/COMMIT.md §2.1) must not change what the device sees
/// nor hide a failed write.
@Suite("Write-behind", .strictVerify)
struct WriteBehindTests {
    /// Goal: a payload write that fails on the background thread is never lost silently.
    /// Method: fail the first device write after enabling write-behind; the failure must
    /// surface as `io` at the write or at the following sync, everything after is
    /// `poisoned`, and the durable image still opens to the state before the write.
    @Test("a payload write failing in the background surfaces at the next call and poisons")
    func failureSurfaces() throws {
        let (pool, device) = try makePool()
        let v = try pool.createVolume(name: "v", size: 64 * 4096)
        try v.write(at: 0, from: pattern(8192, seed: 1))
        try pool.sync()
        let before = device.durable
        pool.engine.enableWriteBehind()
        device.failWriteAt = device.writeCount + 1
        var sawIO = false
        do {
            try v.write(at: 0, from: pattern(64 * 4096, seed: 2))
            try pool.sync()
        } catch PoolError.io {
            sawIO = true
        }
        #expect(sawIO, "the failed background write was not reported")
        expectPoolError({ if case .poisoned = $0 { true } else { false } }) { _ = try v.read(at: 0, length: 4096) }
        expectPoolError({ if case .poisoned = $0 { true } else { false } }) { try pool.sync() }
        let (reopened, _) = try reopen(device, image: before)
        #expect(try reopened.openVolume(name: "v").read(at: 0, length: 8192) == pattern(8192, seed: 1))
    }

    /// Goal: queued writes are read back before they reach the device, and a sync makes
    /// all of them durable. Method: many overlapping writes of 1 MiB and small sizes, each
    /// read back at once; then sync, crash (durable image only) and compare.
    @Test("reads see queued writes; sync makes them all durable", arguments: [CompressionMode.none, .lz4])
    func readAfterQueuedWrite(compression: CompressionMode) throws {
        let (pool, device) = try makePool(capacity: 32 << 20, segmentSize: nil, compression: compression)
        pool.engine.enableWriteBehind()
        let v = try pool.createVolume(name: "v", size: 8 << 20)
        var expected = [UInt8](repeating: 0, count: 8 << 20)
        for round in 0..<40 {
            let length = round % 3 == 0 ? 1 << 20 : 4096 * (1 + round % 5) + 100
            let offset = (round * 786_433) % ((8 << 20) - length)
            let data = pattern(length, seed: UInt8(round))
            try v.write(at: UInt64(offset), from: data)
            expected.replaceSubrange(offset..<offset + length, with: data)
            #expect(try v.read(at: UInt64(offset), length: length) == data, "round \(round)")
        }
        try pool.sync()
        let (reopened, _) = try reopen(device, image: device.durable)
        #expect(try reopened.openVolume(name: "v").read(at: 0, length: expected.count) == expected)
    }
}
