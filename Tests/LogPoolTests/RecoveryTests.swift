import Foundation
import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// A pool with synced content and its model, on the 8 MiB test geometry.
func syncedPool() throws -> (SimulatedDevice, ReferenceModel) {
    let (pool, device) = try makePool()
    let model = try populate(pool)
    try pool.sync()
    return (device, model)
}

func expectCorrupt(_ structure: String, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    expectPoolError({ error in
        if case .corrupt(let s, _, _) = error { return s == structure }
        return false
    }, "expected corrupt(\(structure))", sourceLocation: sourceLocation, body)
}

func writeLE(_ value: UInt64, into image: inout [UInt8], at offset: Int) {
    withUnsafeBytes(of: value.littleEndian) { for i in 0..<8 { image[offset + i] = $0[i] } }
}

@Suite("Recovery from damage")
struct RecoveryTests {
    @Test("damage to the last journal batch recovers to the last whole record before it")
    func tornJournalTail() throws {
        let (pool, device) = try makePool()
        var model = try populate(pool)
        try pool.sync()
        let synced = model
        try pool.openVolume(name: "v").write(at: 0, from: pattern(4096, seed: 77))
        model.write("v", at: 0, pattern(4096, seed: 77))
        // Capture the journal batch this sync writes (the ring starts at 8192).
        var journalWrites: [(byteOffset: Int, bytes: [UInt8])] = []
        device.beforeSync = { dev in
            journalWrites = dev.pending.filter { $0.byteOffset >= 8192 && $0.byteOffset < 8192 + 256 * 1024 }
        }
        try pool.sync()
        device.beforeSync = nil
        try #require(!journalWrites.isEmpty, "the sync wrote no journal batch")
        var image = device.durable
        for w in journalWrites { for i in 0..<min(512, w.bytes.count) { image[w.byteOffset + i] ^= 0xFF } }
        let (recovered, _) = try reopen(device, image: image)
        #expect(try contents(of: recovered) == logical(synced))
        let reason = recovered.recoveryReport.replayStopReason
        #expect(reason.contains("torn or damaged") || reason.contains("no valid record"), "\(reason)")
    }

    @Test("a damaged superblock slot is survived and reported", arguments: [0, 1])
    func oneSlotDamaged(slot: Int) throws {
        let (device, model) = try syncedPool()
        var image = device.durable
        let base = Int(PoolGeometry.superblockSlotByteOffsets[slot])
        image[base + 40] ^= 0x01
        let (recovered, _) = try reopen(device, image: image)
        try expectMatches(recovered, model)
        // Read-write open committed a new checkpoint into the damaged (older) slot or the
        // other; either way the problem was reported at open.
        let ro = try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly)
        let problem = ro.recoveryReport.otherSlotProblem ?? ""
        #expect(problem.contains("checksum") || problem.contains("stale") || problem.contains("parent"), "\(problem)")
    }

    @Test("both slots damaged is corrupt(superblock)")
    func bothSlotsDamaged() throws {
        let (device, _) = try syncedPool()
        var image = device.durable
        image[40] ^= 1
        image[4096 + 40] ^= 1
        expectCorrupt("superblock") { _ = try Pool.open(on: SimulatedDevice(image: image)) }
    }

    @Test("a damaged checkpoint page is corrupt naming the page, never a trap")
    func damagedPage() throws {
        let (pool, device) = try makePool()
        _ = try populate(pool)
        try pool.close()
        var image = device.currentImage
        // Find the pages through the superblock: flip a byte in every 4 KiB page of the
        // segment holding the checkpoint root, one image per page.
        let slotA = try Superblock.decode(Array(image[0..<512]), slotIndex: 0)
        let slotB = try Superblock.decode(Array(image[4096..<4608]), slotIndex: 1)
        let sb = slotA.generation > slotB.generation ? slotA : slotB
        let root = Int(sb.checkpointByteOffset)
        image[root + 20] ^= 0x40
        expectCorrupt("checkpoint") { _ = try Pool.open(on: SimulatedDevice(image: image)) }
        // Pages: damage bytes before the root in the same segment (where pages are written).
        var sawPageError = false
        for offset in stride(from: root - 4096, through: max(root - 8 * 4096, 0), by: -4096) {
            var damaged = device.currentImage
            damaged[offset + 100] ^= 0x08
            do {
                let opened = try Pool.open(on: SimulatedDevice(image: damaged))
                // Not a page (a data block): reading must then fail its checksum or succeed.
                for row in try opened.list() { _ = try? opened.openVolume(name: row.name).read(at: 0, length: Int(row.sizeBytes)) }
            } catch let error as PoolError {
                if case .corrupt(let structure, _, _) = error, structure.hasSuffix("page") { sawPageError = true }
            }
        }
        #expect(sawPageError)
    }

    @Test("a damaged data block reads as corrupt(data block), other blocks still read")
    func damagedData() throws {
        let (pool, device) = try makePool()
        let v = try pool.createVolume(name: "v", size: 8 * 4096)
        try v.write(at: 0, from: pattern(8 * 4096, seed: 1))
        try pool.close()
        var image = device.currentImage
        // The first data block sits right after segment 0's header... find it by content.
        let needle = pattern(8 * 4096, seed: 1)[0..<64]
        guard let at = (0..<(image.count - 64)).first(where: { image[$0] == needle.first! && Array(image[$0..<$0 + 64]) == Array(needle) }) else {
            Issue.record("data not found in image"); return
        }
        image[at + 10] ^= 1
        let reopened = try Pool.open(on: SimulatedDevice(image: image))
        expectCorrupt("data block") { _ = try reopened.openVolume(name: "v").read(at: 0, length: 100) }
        #expect(try reopened.openVolume(name: "v").read(at: 4096, length: 7 * 4096) == Array(pattern(8 * 4096, seed: 1)[4096...]))
    }

    @Test("a failed fsync poisons the pool; reopening recovers the synced state")
    func fsyncFailure() throws {
        let (pool, device) = try makePool()
        let model = try populate(pool)
        try pool.sync()
        device.failSyncAt = device.syncCount + 1
        try pool.openVolume(name: "v").write(at: 0, from: [1, 2, 3])
        expectPoolError({ if case .io = $0 { true } else { false } }) { try pool.sync() }
        expectPoolError({ if case .poisoned = $0 { true } else { false } }) { try pool.openVolume(name: "v").write(at: 0, from: [4]) }
        expectPoolError({ if case .poisoned = $0 { true } else { false } }) { try pool.sync() }
        let (recovered, _) = try reopen(device, image: device.durable)
        try expectMatches(recovered, model)
    }

    @Test("a failed write poisons the pool")
    func writeFailure() throws {
        let (pool, device) = try makePool()
        let v = try pool.createVolume(name: "v", size: 64 * 4096)
        device.failWriteAt = device.writeCount + 1
        expectPoolError({ if case .io = $0 { true } else { false } }) { try v.write(at: 0, from: pattern(4096, seed: 2)) }
        expectPoolError({ if case .poisoned = $0 { true } else { false } }) { try pool.createVolume(name: "w", size: 4096) }
    }
}

@Suite("Bad input")
struct BadInputTests {
    @Test("an empty file, random bytes, a foreign file and a truncated pool are typed errors")
    func notAPool() throws {
        expectCorrupt("pool file") { _ = try Pool.open(on: SimulatedDevice(byteCount: 0)) }
        var generator = SeededGenerator(seed: 9)
        for size in [1, 100, 4608, 9000, 1 << 20] {
            let random = (0..<size).map { _ in UInt8.random(in: 0...255, using: &generator) }
            expectPoolError({ if case .corrupt = $0 { true } else { false } }, "size \(size)") {
                _ = try Pool.open(on: SimulatedDevice(image: random))
            }
        }
        let text = Array(String(repeating: "not a pool\n", count: 1000).utf8)
        expectPoolError({ error in
            if case .corrupt(_, _, let detail) = error { return detail.contains("bad magic") }
            return false
        }) { _ = try Pool.open(on: SimulatedDevice(image: text)) }
        let (device, _) = try syncedPool()
        let truncated = Array(device.durable.prefix(1 << 20))
        expectPoolError({ error in
            if case .corrupt(_, _, let detail) = error { return detail.contains("truncated") }
            return false
        }) { _ = try Pool.open(on: SimulatedDevice(image: truncated)) }
        expectPoolError({ if case .corrupt = $0 { true } else { false } }) {
            _ = try Pool.open(on: SimulatedDevice(image: Array(device.durable.prefix(3000))))
        }
    }

    @Test("a future format version is refused by name")
    func futureVersion() throws {
        let (device, _) = try syncedPool()
        var image = device.durable
        for base in [0, 4096] {
            image[base + 8] = 9
            let sum = Checksum.xxh3(Array(image[base..<base + 504]))
            writeLE(sum, into: &image, at: base + 504)
        }
        expectPoolError({ error in
            error == .unsupportedFormat(version: 9, supported: PoolGeometry.formatVersion)
                && error.description.contains("created by a newer LogPool")
        }) { _ = try Pool.open(on: SimulatedDevice(image: image)) }
    }

    /// Format 2 (issue 11) changed the checkpoint root; a pool of format 1 is not damage
    /// but cannot be read: open says so by name, read-only too, and writes nothing.
    @Test("a format-1 pool is refused as created by an older LogPool, and left unchanged")
    func olderVersion() throws {
        let (device, _) = try syncedPool()
        var image = device.durable
        for base in [0, 4096] {
            image[base + 8] = 1
            let sum = Checksum.xxh3(Array(image[base..<base + 504]))
            writeLE(sum, into: &image, at: base + 504)
        }
        for mode in [OpenMode.readWrite, .readOnly] {
            let older = SimulatedDevice(image: image)
            expectPoolError({ error in
                error == .unsupportedFormat(version: 1, supported: PoolGeometry.formatVersion)
                    && error.description.hasPrefix("created by an older LogPool: pool format version 1")
            }) { _ = try Pool.open(on: older, mode: mode) }
            #expect(older.currentImage == image)
        }
        // With one slot damaged as well, it is still the version that is named.
        image[4096 + 200] ^= 0xFF
        expectPoolError({ $0 == .unsupportedFormat(version: 1, supported: PoolGeometry.formatVersion) }) {
            _ = try Pool.open(on: SimulatedDevice(image: image))
        }
    }

    /// Goal: open never traps, whatever bytes. Method: seeded bit flips and garbage
    /// sectors anywhere in a real pool image; open (read-only) must return a pool or a
    /// typed error, and a returned pool must read every volume or throw typed errors.
    @Test("random damage anywhere never traps open or read", arguments: [UInt64(11), 12, 13])
    func randomDamage(seed: UInt64) throws {
        let (device, _) = try syncedPool()
        var generator = SeededGenerator(seed: seed)
        for _ in 0..<40 {
            var image = device.durable
            for _ in 0..<Int.random(in: 1...4, using: &generator) {
                let offset = Int.random(in: 0..<(1 << 20), using: &generator)
                if Bool.random(using: &generator) {
                    image[offset] ^= 1 << UInt8.random(in: 0...7, using: &generator)
                } else {
                    let sector = offset / 512 * 512
                    for i in 0..<512 { image[sector + i] = UInt8.random(in: 0...255, using: &generator) }
                }
            }
            do {
                let pool = try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly)
                for row in try pool.list() {
                    do { _ = try pool.openVolume(name: row.name).read(at: 0, length: Int(row.sizeBytes)) } catch is PoolError {}
                }
            } catch is PoolError {
            }
        }
    }

    @Test("invalid geometry and sizes are invalidArgument")
    func badGeometry() {
        for (capacity, block, segment) in [(8 << 20, 1000, nil), (8 << 20, 4096, 1000), (1 << 20, 4096, nil), (4 << 20 - 4096, 4096, nil), (8 << 20, 131072, nil), (8 << 20, 4096, 32 << 10)] as [(Int, Int, Int?)] {
            expectPoolError({ if case .invalidArgument = $0 { true } else { false } }, "\(capacity) \(block) \(String(describing: segment))") {
                _ = try Pool.create(on: SimulatedDevice(byteCount: capacity), capacity: UInt64(capacity), blockSize: block, segmentSize: segment)
            }
        }
    }
}
