import Foundation
@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// A small pool with a volume, a snapshot of it and a diverged clone, cleanly closed.
/// `v` and `s` share every block of the first 64 KiB; `c` rewrote its first block.
private func fixture(compression: CompressionMode = .none) throws -> (device: SimulatedDevice, blockSize: UInt64) {
    let (pool, device) = try makePool(capacity: 8 << 20, compression: compression)
    let v = try pool.createVolume(name: "v", size: 1 << 20)
    try v.write(at: 0, from: pattern(256 << 10, seed: 1))
    try pool.snapshot(source: "v", name: "s")
    let c = try pool.clone(source: "s", name: "c")
    try c.write(at: 0, from: pattern(4096, seed: 9))
    try pool.close()
    return (device, 4096)
}

private func verify(_ image: [UInt8], scrub: Bool = true) throws -> VerifyReport {
    try Pool.verify(on: SimulatedDevice(image: image), scrubData: scrub)
}

private func problems(_ report: VerifyReport) -> [String] {
    report.problems.map(\.code)
}

/// Changes the checkpoint root the newest valid slot of `image` names and commits the
/// change in that slot (new root checksum, slot re-encoded): a damaged state built from
/// the format alone, as a bug in the engine could have written it.
private func rewriteCheckpointRoot(_ image: inout [UInt8], _ change: (inout CheckpointRoot) -> Void) throws {
    func slot(_ index: Int) -> Result<Superblock, CorruptionError> {
        let offset = Int(PoolGeometry.superblockSlotByteOffsets[index])
        let bytes = Array(image[offset..<offset + PoolGeometry.superblockByteCount])
        return Result { () throws(CorruptionError) in try Superblock.decode(bytes, slotIndex: index) }
    }
    var sb = try chooseSuperblock(slot(0), slot(1)).chosen
    let start = Int(sb.checkpointByteOffset), count = Int(sb.checkpointByteCount)
    var root = try CheckpointRoot.decode(Array(image[start..<start + count]), expectedChecksum: sb.checkpointChecksum,
                                         salt: sb.poolSalt, byteOffset: sb.checkpointByteOffset, geometry: sb.geometry)
    change(&root)
    let encoded = root.encode(salt: sb.poolSalt)
    #expect(encoded.bytes.count == count, "the changed root must keep its size")
    image.replaceSubrange(start..<start + count, with: encoded.bytes)
    sb.checkpointChecksum = encoded.checksum
    let slotOffset = Int(PoolGeometry.superblockSlotByteOffsets[sb.slotIndex])
    image.replaceSubrange(slotOffset..<slotOffset + PoolGeometry.superblockByteCount, with: sb.encode())
}

/// Opens `image` read-only to find where things are (the checker itself never does).
private func locate<T>(_ image: [UInt8], _ body: (Engine) throws -> T) throws -> T {
    let pool = try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly)
    return try body(pool.engine)
}

private func blockLocation(_ engine: Engine, volume name: String, blockIndex: UInt64) throws -> BlockLocation {
    let volume = engine.volumes[engine.volumeIDsByName[name]!]!
    return try engine.blockLocation(engine.mapLookup(volume.map, blockIndex: blockIndex))
}

private func flip(_ image: inout [UInt8], _ offset: UInt64, bit: Int = 0) {
    image[Int(offset)] ^= UInt8(1 << bit)
}

/// Journal records from the replay start, in ring order: (file offset, header).
private func journalRecords(_ image: [UInt8]) throws -> [(offset: UInt64, header: JournalRecord.Header)] {
    let sb = try locate(image) { $0.superblock }
    var records: [(UInt64, JournalRecord.Header)] = []
    var ring = Int(sb.journalReplayByteOffset)
    let ringBytes = Int(sb.geometry.journalByteCount)
    while ring + JournalRecordLayout.headerByteCount <= ringBytes {
        let offset = PoolGeometry.journalByteOffset + UInt64(ring)
        let header = try? image.withUnsafeBytes { raw in
            try JournalRecord.decodeHeader(UnsafeRawBufferPointer(rebasing: raw[Int(offset)...]), byteOffset: offset)
        }
        guard let header, header.epoch >= sb.generation else { break }
        records.append((offset, header))
        ring += JournalRecordLayout.headerByteCount + header.payloadByteCount
        if ring % PoolGeometry.sectorByteCount != 0 && PoolGeometry.sectorByteCount - ring % PoolGeometry.sectorByteCount < JournalRecordLayout.headerByteCount {
            ring += PoolGeometry.sectorByteCount - ring % PoolGeometry.sectorByteCount
        }
    }
    return records
}

@Suite("Verify, scrub and repair")
struct VerifyTests {
    @Test("a healthy pool verifies and scrubs clean, with every figure filled in")
    func clean() throws {
        let (device, _) = try fixture()
        let report = try verify(device.currentImage)
        #expect(report.isClean && report.warningCount == 0, "\(report.problems)")
        #expect(report.volumeCount == 3 && report.referencedBlockCount == 65 && report.pageCount >= 4)
        #expect(report.findings.contains { $0.code == "superblock-chosen" } && report.findings.contains { $0.code == "superblock-previous" })
        #expect(report.scrubbedByteCount >= 65 * 4096 && report.exitStatus == 0)
    }

    /// Goal: one damaged slot is found, named, and rewritten by repair; both damaged is
    /// reported as unrepairable. Method: flip one byte in each slot in turn.
    @Test("a damaged superblock slot is reported and repaired; both slots damaged is not repairable")
    func superblockSlots() throws {
        let (device, _) = try fixture()
        let clean = device.currentImage
        for slot in 0..<2 {
            var image = clean
            flip(&image, PoolGeometry.superblockSlotByteOffsets[slot] + 100)
            let report = try verify(image)
            let damaged = report.problems.filter { $0.code == "superblock-damaged" }
            #expect(damaged.count == 1 && damaged[0].structure == Superblock.structureName(slotIndex: slot), "\(report.problems)")
            #expect(damaged.first?.byteOffset == PoolGeometry.superblockSlotByteOffsets[slot] && damaged.first?.repairable == true)
            let repairDevice = SimulatedDevice(image: image)
            let repaired = try Pool.repair(on: repairDevice)
            #expect(repaired.exitStatus == 1 && repaired.after.isClean, "slot \(slot): \(repaired.after.problems)")
            #expect(repaired.changes.contains { $0.hasPrefix("fixed: superblock-damaged") })
            #expect(try verify(repairDevice.currentImage).problems.isEmpty)
        }
        var both = clean
        flip(&both, 100)
        flip(&both, 4096 + 100)
        let report = try verify(both)
        #expect(problems(report).contains("no-valid-superblock") && report.exitStatus == 4)
        let repaired = try Pool.repair(on: SimulatedDevice(image: both))
        #expect(repaired.exitStatus == 4)
    }

    /// Goal: no single-bit flip anywhere in either slot goes unnoticed.
    @Test("every single-bit flip of a superblock slot is detected")
    func everySuperblockBit() throws {
        let (pool, device) = try makePool(capacity: 4 << 20)
        try pool.close()
        let image = device.currentImage
        // One device, flipped and restored in place: the checker reads `current`.
        let probe = SimulatedDevice(image: image)
        for slot in 0..<2 {
            let base = Int(PoolGeometry.superblockSlotByteOffsets[slot])
            for byte in 0..<PoolGeometry.superblockByteCount {
                for bit in 0..<8 {
                    let flipped = [image[base + byte] ^ UInt8(1 << bit)]
                    try probe.write(flipped, at: UInt64(base + byte))
                    let report = try Pool.verify(on: probe)
                    guard !report.isClean else {
                        Issue.record("slot \(slot) byte \(byte) bit \(bit): flip not detected")
                        return
                    }
                    try probe.write([image[base + byte]], at: UInt64(base + byte))
                }
            }
        }
    }

    /// Goal: a damaged checkpoint page is named with its offset and is not "repaired" by
    /// dropping what it held.
    @Test("a damaged map page is reported with its offset and left for the operator")
    func checkpointPage() throws {
        let (device, _) = try fixture()
        var image = device.currentImage
        let page = try locate(image) { engine in engine.volumes[engine.volumeIDsByName["c"]!]!.map.root!.disk.byteOffset }
        flip(&image, page + 200)
        let report = try verify(image)
        let found = report.problems.first { $0.code == "page-damaged" }
        #expect(found?.structure == "map page" && found?.byteOffset == page && found?.repairable == false, "\(report.problems)")
        #expect(found?.detail.contains("volume c") == true)
        let repaired = try Pool.repair(on: SimulatedDevice(image: image))
        #expect(repaired.exitStatus == 4 && repaired.after.problems.contains { $0.code == "page-damaged" })
    }

    /// Goal: a damaged data block is found by scrub (not by verify, which reads no
    /// data), with every owner, and repair keeps it reported.
    @Test("a damaged data block is reported with every owner, for both plain and compressed blocks",
          arguments: [CompressionMode.none, .lz4])
    func dataBlock(compression: CompressionMode) throws {
        let (device, blockSize) = try fixture(compression: compression)
        var image = device.currentImage
        let location = try locate(image) { try blockLocation($0, volume: "v", blockIndex: 3) }
        #expect(location.isCompressed == (compression == .lz4))
        flip(&image, location.byteOffset + 7, bit: 3)
        #expect(try verify(image, scrub: false).isClean)
        let report = try verify(image)
        let found = report.problems.filter { $0.code == "data-damaged" }
        #expect(found.count == 1 && report.damagedBlockCount == 1, "\(report.problems)")
        #expect(found.first?.structure == (compression == .lz4 ? "compressed data block" : "data block"))
        #expect(found.first?.byteOffset == location.byteOffset)
        // v, its snapshot s and the clone c (which rewrote only block 0) all read it.
        let owners = found.first?.owners ?? []
        #expect(owners == ["c", "s", "v"].map { BlockOwner(volume: $0, byteOffset: 3 * blockSize) })
        let repairDevice = SimulatedDevice(image: image)
        let repaired = try Pool.repair(on: repairDevice, scrubData: true)
        #expect(repaired.exitStatus == 4 && repaired.after.damagedBlockCount == 1)
        let pool = try Pool.open(on: repairDevice)
        expectPoolError({ if case .corrupt = $0 { true } else { false } }) { _ = try pool.openVolume(name: "v").read(at: 3 * blockSize, length: 4096) }
    }

    /// Goal: a torn journal tail is a repairable warning; damage inside synced journal
    /// space is an error that names the records that cannot be replayed.
    @Test("journal: a torn tail is a warning that repair clears; damage inside synced space is an error")
    func journal() throws {
        let (pool, device) = try makePool(capacity: 8 << 20)
        let v = try pool.createVolume(name: "v", size: 1 << 20)
        try pool.checkpoint()
        try v.write(at: 0, from: pattern(8192, seed: 1))
        try pool.sync()
        try v.write(at: 65536, from: pattern(8192, seed: 2))
        try pool.sync()
        let image = device.currentImage
        let records = try journalRecords(image).filter { $0.header.kind != 1 }
        #expect(records.count == 2)
        guard records.count == 2 else { return }
        #expect(try verify(image).problems.isEmpty)

        var tail = image
        flip(&tail, records[1].offset + UInt64(JournalRecordLayout.headerByteCount) + 3)
        let torn = try verify(tail)
        #expect(problems(torn) == ["journal-torn-tail"] && torn.isClean, "\(torn.problems)")
        let cleanCount = try verify(image).replayedRecordCount
        #expect(torn.replayedRecordCount >= 1 && torn.replayedRecordCount < cleanCount, "\(torn.replayStop)")
        #expect(torn.problems.first?.byteOffset == records[1].offset)
        let tailDevice = SimulatedDevice(image: tail)
        let repaired = try Pool.repair(on: tailDevice)
        #expect(repaired.after.problems.isEmpty && repaired.exitStatus == 0, "\(repaired.after.problems)")

        var synced = image
        flip(&synced, records[0].offset + UInt64(JournalRecordLayout.headerByteCount) + 3)
        let lost = try verify(synced)
        let found = lost.problems.first { $0.code == "journal-synced-damage" }
        #expect(found?.byteOffset == records[0].offset && found?.repairable == false && lost.exitStatus == 4, "\(lost.problems)")
        // With a repairable finding beside it, repair still must not commit past the
        // damage (that would discard the synced records after it).
        let chosen = lost.chosenSlot == "A" ? 0 : 1
        flip(&synced, PoolGeometry.superblockSlotByteOffsets[1 - chosen] + 100)
        let refusingDevice = SimulatedDevice(image: synced)
        let refused = try Pool.repair(on: refusingDevice)
        #expect(refused.exitStatus == 4 && refused.changes.first?.hasPrefix("not repaired") == true, "\(refused.changes)")
        #expect(refusingDevice.writeCount == 0 && refusingDevice.currentImage == synced)
    }

    /// Goal (FORMAT §5.3): a damaged block-table leaf that holds no referenced id loses
    /// nothing. Verify reports it as a warning; open (which reads no leaf for usage)
    /// and reads work; the write that takes an id in its range replaces it with an empty
    /// leaf instead of failing, and the pool then verifies with no finding at all.
    /// Fails if verify calls it an error or a write into its range throws.
    @Test("a damaged block-table leaf with no referenced id is a warning, and writes replace it")
    func damagedFreeTableLeaf() throws {
        let (pool, device) = try makePool(capacity: 16 << 20)
        let v = try pool.createVolume(name: "v", size: 4 << 20)
        try v.write(at: 0, from: pattern(2 << 20, seed: 3))
        // Blocks 0..<256 had ids 1...256: leaf 0 (ids 0..<169) is left with none.
        try v.discard(at: 0, length: 1 << 20)
        try pool.close()
        var image = device.currentImage
        let leaf = try {
            let reader = try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly)
            let root = try #require(reader.engine.blockTable.root)
            return try #require(root.level == 0 ? root : root.children[0]).disk.byteOffset
        }()
        flip(&image, leaf + 100)
        let report = try verify(image)
        let found = report.problems.first { $0.code == "page-damaged" }
        #expect(found?.severity == .warning && found?.byteOffset == leaf && report.isClean, "\(report.problems)")
        let damagedDevice = SimulatedDevice(image: image)
        let reopened = try Pool.open(on: damagedDevice)
        let w = try reopened.openVolume(name: "v")
        #expect(try w.read(at: 0, length: 2 << 20) == [UInt8](repeating: 0, count: 1 << 20) + Array(pattern(2 << 20, seed: 3)[(1 << 20)...]))
        var written = 0
        while reopened.engine.replacedDamagedTableLeafCount == 0 && written < 4 << 20 {
            try w.write(at: UInt64(written % (1 << 20)), from: pattern(64 << 10, seed: UInt8(written >> 16)))
            written += 64 << 10
        }
        #expect(reopened.engine.replacedDamagedTableLeafCount == 1, "no write took an id of the damaged leaf")
        try reopened.close()
        let after = try verify(damagedDevice.currentImage)
        #expect(after.problems.isEmpty, "\(after.problems)")
    }

    /// Goal: a refcount page that fails its checksum costs nothing but a rebuild: verify
    /// warns (repairable), open rebuilds every count from the maps and says so, the data
    /// reads back, and the next checkpoint writes a whole tree that verifies clean.
    @Test("a damaged refcount page: verify warns, open rebuilds the counts from the maps, repair rewrites it")
    func damagedRefcountPage() throws {
        let (device, _) = try fixture()
        var image = device.currentImage
        let (page, counts) = try locate(image) { engine in
            (try #require(engine.refcountTree.root).disk.byteOffset, try (0..<engine.ids.limit).map { try engine.refcount($0) })
        }
        #expect(counts.contains { $0 > 1 }, "the fixture shares blocks")
        flip(&image, page + 300)
        let report = try verify(image)
        let found = report.problems.first { $0.code == "refcounts-damaged" }
        #expect(found?.severity == .warning && found?.repairable == true && found?.byteOffset == page, "\(report.problems)")
        #expect(!problems(report).contains("refcount-mismatch"), "a damaged tree is not compared: \(report.problems)")

        // Open reads no refcount leaf (they are paged); the first change that needs the
        // damaged one rebuilds every count from the maps before it journals anything.
        let damaged = SimulatedDevice(image: image)
        let pool = try Pool.open(on: damaged)
        #expect(!pool.recoveryReport.rebuiltRefcounts && pool.engine.liveRefcountRebuildCount == 0)
        #expect(try pool.openVolume(name: "v").read(at: 0, length: 256 << 10) == pattern(256 << 10, seed: 1))
        let c = try pool.openVolume(name: "c")
        #expect(try c.read(at: 0, length: 4096) == pattern(4096, seed: 9))
        try c.write(at: 8192, from: pattern(4096, seed: 10))
        #expect(pool.engine.liveRefcountRebuildCount == 1)
        let shared = try pool.engine.mapLookup(pool.engine.volumes[pool.engine.volumeIDsByName["v"]!]!.map, blockIndex: 5)
        #expect(try pool.engine.refcount(shared) == 2 && counts[Int(shared)] == 2, "v and s share one leaf naming it, c its own copy")
        #expect(pool.internalConsistencyProblems() == [])
        try pool.close()
        let after = try verify(damaged.currentImage)
        #expect(after.problems.isEmpty, "\(after.problems)")

        let repairDevice = SimulatedDevice(image: image)
        let repaired = try Pool.repair(on: repairDevice)
        #expect(repaired.exitStatus == 0 && repaired.after.problems.isEmpty, "\(repaired.after.problems) \(repaired.changes)")
        #expect(repaired.changes.contains { $0.hasPrefix("fixed: refcounts-damaged") }, "\(repaired.changes)")
    }

    /// Rewrites the (single-leaf) refcount tree of `image` with `change` applied to its
    /// words, with valid checksums: counts a bug could have stored.
    private func rewriteRefcounts(_ image: inout [UInt8], _ change: (inout [UInt64]) -> Void) throws {
        let (pointer, height, salt) = try locate(image) { engine in
            (try #require(engine.refcountTree.root).disk, engine.refcountTree.height, engine.superblock.poolSalt)
        }
        try #require(height == 1, "a small pool has a one-leaf refcount tree")
        let start = Int(pointer.byteOffset)
        var words = try PageLayout.decode(Array(image[start..<start + PoolGeometry.pageByteCount]), kind: .refcounts, level: 0,
                                          expectedChecksum: pointer.checksum, salt: salt, byteOffset: pointer.byteOffset)
        change(&words)
        let encoded = PageLayout.encode(kind: .refcounts, level: 0, words: words, salt: salt)
        image.replaceSubrange(start..<start + PoolGeometry.pageByteCount, with: encoded.bytes)
        try rewriteCheckpointRoot(&image) { $0.refcountRoot.checksum = encoded.checksum }
    }

    /// Goal: stored counts that contradict the maps, with every checksum valid, are found
    /// by verify (`refcount-mismatch`, an error), rebuilt by repair, and a release of an
    /// id whose stored count is already zero is corrupt(refcount page), never a trap.
    @Test("stored counts that contradict the maps: verify reports refcount-mismatch, repair rebuilds, release of a zero count is corrupt")
    func wrongStoredCounts() throws {
        let (device, _) = try fixture()
        let clean = device.currentImage
        let (shared, own) = try locate(clean) { engine in
            (try engine.mapLookup(engine.volumes[engine.volumeIDsByName["v"]!]!.map, blockIndex: 5),
             try engine.mapLookup(engine.volumes[engine.volumeIDsByName["c"]!]!.map, blockIndex: 0))
        }
        #expect(shared != 0 && own != 0 && shared != own)
        func bump(_ words: inout [UInt64], _ id: UInt64, by delta: Int64) {
            let shift = UInt64(id % 2 * 32)
            let count = Int64(words[Int(id / 2)] >> shift & 0xFFFF_FFFF) + delta
            words[Int(id / 2)] = words[Int(id / 2)] & ~(0xFFFF_FFFF << shift) | UInt64(count) << shift
        }

        var high = clean
        try rewriteRefcounts(&high) { bump(&$0, shared, by: 3) }
        let report = try verify(high)
        let found = report.problems.first { $0.code == "refcount-mismatch" }
        #expect(found?.severity == .error && found?.repairable == true, "\(report.problems)")
        #expect(found?.detail.contains("\(shared)") == true, "names the id: \(found?.detail ?? "")")
        #expect(report.exitStatus != 0)
        let repaired = try Pool.repair(on: SimulatedDevice(image: high))
        #expect(repaired.after.problems.isEmpty, "\(repaired.after.problems) \(repaired.changes)")
        #expect(repaired.changes.contains { $0.contains("refcount-mismatch") }, "\(repaired.changes)")

        // C-10: a stored live count that differs from the maps is a mismatch too, which
        // repair rewrites; one far too low (crafted) cannot make allocation reuse an id
        // or trap: the sweep reads every count, and writes go on.
        for delta in [Int64(5), -Int64(3)] {
            var live = clean
            try rewriteCheckpointRoot(&live) { $0.liveBlockCount = UInt64(Int64($0.liveBlockCount) + delta) }
            let found = try verify(live).problems.first { $0.code == "refcount-mismatch" }
            #expect(found?.detail.contains("live block ids") == true && found?.severity == .error, "delta \(delta): \(String(describing: found))")
            let liveDevice = SimulatedDevice(image: live)
            let fixedLive = try Pool.repair(on: SimulatedDevice(image: live))
            #expect(fixedLive.after.problems.isEmpty, "delta \(delta): \(fixedLive.after.problems)")
            let writer = try Pool.open(on: liveDevice)
            try writer.openVolume(name: "c").write(at: 65536, from: pattern(65536, seed: 77))
            #expect(writer.internalConsistencyProblems().filter { !$0.contains("live block count") } == [], "delta \(delta)")
            #expect(try writer.openVolume(name: "v").read(at: 0, length: 256 << 10) == pattern(256 << 10, seed: 1), "delta \(delta): no live id was reused")
        }

        // A count for id 0 breaks C-9: open refuses the tree and rebuilds, so verify
        // calls it damage that loses nothing, not a mismatch.
        var idZero = clean
        try rewriteRefcounts(&idZero) { bump(&$0, 0, by: 1) }
        let c9 = try verify(idZero)
        #expect(problems(c9) == ["refcounts-damaged"] && c9.isClean, "\(c9.problems)")
        // Read-only too: the first use of the leaf (list's exclusive figures) rebuilds
        // the counts in memory.
        let readOnly = try Pool.open(on: SimulatedDevice(image: idZero), mode: .readOnly)
        let listed = try readOnly.list()
        #expect(readOnly.engine.liveRefcountRebuildCount == 1 && listed.count == 3)

        var zero = clean
        try rewriteRefcounts(&zero) { bump(&$0, own, by: -1) }
        #expect(try verify(zero).problems.contains { $0.code == "refcount-mismatch" })
        // The release is found in `apply`, after the record is journaled: the handle is
        // poisoned (the unsynced record may or may not survive, like any unsynced
        // change); repair rebuilds the counts, after which the discard works.
        let zeroDevice = SimulatedDevice(image: zero)
        let pool = try Pool.open(on: zeroDevice)
        let c = try pool.openVolume(name: "c")
        let error = #expect(throws: PoolError.self, "releasing an id whose stored count is zero") { try c.discard(at: 0, length: 4096) }
        #expect("\(error.map { "\($0)" } ?? "")".contains("corrupt refcount page"), "\(String(describing: error))")
        let fixed = try Pool.repair(on: zeroDevice)
        #expect(fixed.after.problems.isEmpty, "\(fixed.after.problems) \(fixed.changes)")
        let reopened = try Pool.open(on: zeroDevice)
        let d = try reopened.openVolume(name: "c")
        try d.discard(at: 0, length: 4096)
        #expect(try d.read(at: 0, length: 8192) == [UInt8](repeating: 0, count: 4096) + pattern(8192, seed: 1)[4096...])
        try reopened.close()
        #expect(try verify(zeroDevice.currentImage).problems.isEmpty)
    }

    /// Goal: a segment header's damage is reported (data is protected by its own
    /// checksums, so it is a warning).
    @Test("a damaged segment header is a warning naming the segment")
    func segmentHeader() throws {
        let (device, _) = try fixture()
        var image = device.currentImage
        let (offset, geometry) = try locate(image) { engine in (try blockLocation(engine, volume: "v", blockIndex: 0).byteOffset, engine.geometry) }
        let segment = geometry.segmentByteOffset(geometry.segmentIndex(containing: offset)!)
        flip(&image, segment + 30)
        let report = try verify(image)
        #expect(problems(report) == ["segment-header"] && report.problems.first?.byteOffset == segment, "\(report.problems)")
        #expect(report.isClean)
    }

    /// Goal: leaks (stored above the truth) and accounting errors (stored below) are
    /// counted apart, with the right bytes, and repair rebuilds them.
    @Test("leaks and accounting errors made on purpose are counted apart and repaired")
    func leaksAndErrors() throws {
        let (pool, device) = try makePool(capacity: 8 << 20)
        let v = try pool.createVolume(name: "v", size: 1 << 20)
        try v.write(at: 0, from: pattern(256 << 10, seed: 4))
        let used = (0..<pool.engine.segmentStates.count).filter { pool.engine.dataLiveByteCounts[$0] > 0 }
        #expect(used.count >= 2)
        try pool.checkpoint()
        var image = device.currentImage
        try rewriteCheckpointRoot(&image) { root in
            for (s, delta) in [(used[0], Int64(8192)), (used[1], -4096), (used[1] + 40, 512)] {
                root.segmentLiveByteCounts[s] = UInt64(Int64(root.segmentLiveByteCounts[s]) + delta)
            }
        }
        let report = try verify(image)
        #expect(report.leakedSegmentCount == 2 && report.leakedByteCount == 8192 + 512, "\(report.problems)")
        #expect(report.accountingErrorSegmentCount == 1 && report.accountingErrorByteCount == 4096)
        #expect(Set(problems(report)) == ["leak", "accounting-error"] && report.exitStatus == 4, "\(report.problems)")
        let repairDevice = SimulatedDevice(image: image)
        let repaired = try Pool.repair(on: repairDevice)
        #expect(repaired.exitStatus == 1 && repaired.after.problems.isEmpty, "\(repaired.after.problems)")
        #expect(repaired.changes.filter { $0.hasPrefix("fixed: leak") }.count == 2)
    }

    enum Damage: String, CaseIterable, Sendable {
        case bitFlip, zeroSector, garbage
    }

    enum Place: String, CaseIterable, Sendable {
        case olderSlot, newerSlot, mapPage, syncedJournalRecord, journalTail, segmentHeader, dataBlock, compressedDataBlock
    }

    /// Applies `damage` to the byte at `offset` (a flip) or to its whole sector.
    private func damage(_ image: inout [UInt8], _ damage: Damage, at offset: UInt64, seed: UInt64) {
        let sector = Int(offset) / 512 * 512
        switch damage {
        case .bitFlip: image[Int(offset)] ^= 0x10
        case .zeroSector: image.replaceSubrange(sector..<sector + 512, with: repeatElement(0, count: 512))
        case .garbage:
            var generator = SeededGenerator(seed: seed)
            image.replaceSubrange(sector..<sector + 512, with: (0..<512).map { _ in UInt8.random(in: 0...255, using: &generator) })
        }
    }

    /// Goal: the damage matrix of the issue: each structure x (bit flip, zeroed sector,
    /// garbage sector) gives the exact finding (code, structure, offset, owners), exit
    /// status, and repair fixes what is repairable. Where a damage is indistinguishable
    /// from a legitimate crash state the expected result says so (Specs/VERIFY.md).
    @Test("damage matrix: every structure x bit flip, zeroed sector, garbage",
          arguments: Place.allCases, Damage.allCases)
    func matrix(place: Place, kind: Damage) throws {
        // Stable across processes (hashValue is not): the names' bytes.
        let seed = (place.rawValue + kind.rawValue).utf8.reduce(UInt64(0)) { $0 &* 31 &+ UInt64($1) }
        var image: [UInt8]
        var offset: UInt64
        var expected: [String]
        var expectedOffset: UInt64? = nil
        var structure: String? = nil
        var repairedStatus: Int32
        var verifyStatus: Int32 = 4
        switch place {
        case .olderSlot, .newerSlot:
            image = try fixture().device.currentImage
            let chosen = try verify(image, scrub: false).chosenSlot == "A" ? 0 : 1
            let slot = place == .newerSlot ? chosen : 1 - chosen
            offset = PoolGeometry.superblockSlotByteOffsets[slot] + 72
            expected = ["superblock-damaged"]
            expectedOffset = PoolGeometry.superblockSlotByteOffsets[slot]
            structure = Superblock.structureName(slotIndex: slot)
            repairedStatus = 1
        case .mapPage:
            image = try fixture().device.currentImage
            offset = try locate(image) { $0.volumes[$0.volumeIDsByName["c"]!]!.map.root!.disk.byteOffset } + 1000
            expected = ["page-damaged", "journal-not-checked"]
            expectedOffset = offset - 1000
            structure = "map page"
            repairedStatus = 4
        case .syncedJournalRecord, .journalTail:
            let (pool, device) = try makePool()
            let v = try pool.createVolume(name: "v", size: 1 << 20)
            try pool.checkpoint()
            try v.write(at: 0, from: pattern(8192, seed: 1))
            try pool.sync()
            try v.write(at: 65536, from: pattern(8192, seed: 2))
            try pool.sync()
            image = device.currentImage
            let records = try journalRecords(image).filter { $0.header.kind != 1 }
            try #require(records.count == 2)
            let record = records[place == .syncedJournalRecord ? 0 : 1]
            offset = record.offset + UInt64(JournalRecordLayout.headerByteCount) + 5
            expectedOffset = record.offset
            if place == .syncedJournalRecord {
                expected = ["journal-synced-damage"]
                repairedStatus = 4
            } else {
                // A flip leaves a decodable header with a bad checksum: a torn tail. A
                // zeroed or garbage sector holds no record at all: the same bytes as a
                // crash before the last batch was written, so nothing to report.
                expected = kind == .bitFlip ? ["journal-torn-tail"] : []
                repairedStatus = 0
                verifyStatus = 0
            }
        case .segmentHeader:
            image = try fixture().device.currentImage
            let (block, geometry) = try locate(image) { (try blockLocation($0, volume: "v", blockIndex: 0).byteOffset, $0.geometry) }
            offset = geometry.segmentByteOffset(geometry.segmentIndex(containing: block)!) + 40
            expected = kind == .zeroSector ? [] : ["segment-header"]
            expectedOffset = offset - 40
            repairedStatus = 0
            verifyStatus = 0
        case .dataBlock, .compressedDataBlock:
            image = try fixture(compression: place == .dataBlock ? .none : .lz4).device.currentImage
            offset = try locate(image) { try blockLocation($0, volume: "s", blockIndex: 5).byteOffset } + 3
            expected = ["data-damaged"]
            expectedOffset = offset - 3
            structure = place == .dataBlock ? "data block" : "compressed data block"
            repairedStatus = 4
        }
        damage(&image, kind, at: offset, seed: seed)
        let report = try verify(image)
        let context = "\(place) \(kind): \(report.problems)"
        #expect(problems(report) == expected, "\(context)")
        if let first = report.problems.first(where: { $0.code == expected.first }) {
            if let expectedOffset { #expect(first.byteOffset == expectedOffset, "\(context)") }
            if let structure { #expect(first.structure == structure, "\(context)") }
            if first.code == "data-damaged" {
                #expect(first.owners.map(\.volume) == ["c", "s", "v"] && first.owners.allSatisfy { $0.byteOffset == 5 * 4096 }, "\(context)")
            }
        }
        #expect(report.exitStatus == verifyStatus, "\(context)")
        let repaired = try Pool.repair(on: SimulatedDevice(image: image), scrubData: true)
        #expect(repaired.exitStatus == repairedStatus, "\(context) after repair: \(repaired.after.problems) \(repaired.changes)")
        if repairedStatus != 4 { #expect(repaired.after.problems.filter { $0.severity == .error }.isEmpty, "\(context)") }
    }

    /// Goal: verify and scrub never write, even on a crashed pool that recovery would
    /// change. Method: count device writes while checking a crash image.
    @Test("verify and scrub never write, even on a crashed pool")
    func neverWrites() throws {
        let (pool, device) = try makePool()
        let v = try pool.createVolume(name: "v", size: 1 << 20)
        try v.write(at: 0, from: pattern(20000, seed: 3))
        try pool.sync()
        try v.write(at: 40000, from: pattern(9000, seed: 4))
        let crashed = device.currentImage
        let probe = SimulatedDevice(image: crashed)
        let report = try Pool.verify(on: probe, scrubData: true)
        #expect(report.replayedRecordCount > 0 && !report.cleanlyClosed)
        #expect(probe.writeCount == 0 && probe.syncCount == 0 && probe.currentImage == crashed)
    }
}
