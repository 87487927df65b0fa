import Foundation
@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// Rewrites the newest superblock slot's checkpoint root on `device` after `edit`
/// (checksums recomputed: a crafted, not a damaged, root). `edit` may also write pages
/// through the device. Only for crafting hostile pools: it overwrites the root in place.
func craftRoot(_ device: BlockDevice, _ edit: (inout CheckpointRoot, Superblock) throws -> Void) throws {
    let slots = try (0..<2).map { index -> Superblock? in
        let bytes = try device.read(byteCount: PoolGeometry.superblockByteCount, at: PoolGeometry.superblockSlotByteOffsets[index])
        return try? Superblock.decode(bytes, slotIndex: index)
    }
    var sb = try #require(slots.compactMap { $0 }.max { $0.generation < $1.generation })
    var root = try CheckpointRoot.decode(try device.read(byteCount: Int(sb.checkpointByteCount), at: sb.checkpointByteOffset),
                                         expectedChecksum: sb.checkpointChecksum, salt: sb.poolSalt,
                                         byteOffset: sb.checkpointByteOffset, geometry: sb.geometry)
    try edit(&root, sb)
    let (bytes, checksum) = root.encode(salt: sb.poolSalt)
    try device.write(bytes, at: sb.checkpointByteOffset)
    sb.checkpointByteCount = UInt64(bytes.count)
    sb.checkpointChecksum = checksum
    try device.write(sb.encode(), at: PoolGeometry.superblockSlotByteOffsets[sb.slotIndex])
}

func expectCorrupt(structure: String, detailContains fragment: String = "", sourceLocation: SourceLocation = #_sourceLocation,
                   _ body: () throws -> Void) {
    expectPoolError({ error in
        guard case .corrupt(let s, _, let detail) = error else { return false }
        return s == structure && (fragment.isEmpty || detail.contains(fragment))
    }, sourceLocation: sourceLocation, body)
}

/// The library half of issue "eight ways a hostile or careless user still breaks the
/// promises": each test is named after what it checks and failed on the code before.
@Suite("Hardening: hostile pools and careless callers")
struct HardeningTests {
    /// Goal (issue item 1, promise 5): a pool whose journal is damaged inside synced space
    /// is refused by every open, read-only included, unless salvage is asked for; the
    /// salvaging open says what is lost. Method: two synced batches, flip a byte in the
    /// first record after the replay start, open read-only with and without salvage.
    @Test("synced journal damage fails a read-only open too; salvage reads what precedes it and names the loss")
    func syncedJournalDamageRefusesReadOnlyOpen() throws {
        let image = try DamagedImages.syncedJournalDamage().damaged
        expectCorrupt(structure: "journal record", detailContains: "lost") {
            _ = try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly)
        }
        let salvaging = SimulatedDevice(image: image)
        let salvaged = try Pool.open(on: salvaging, mode: .readOnly, acceptJournalLoss: true)
        #expect(salvaged.recoveryReport.syncedJournalDamage)
        #expect(salvaged.recoveryReport.syncedJournalLoss?.contains("cannot be replayed") == true)
        #expect(salvaging.writeCount == 0)
        #expect(try salvaged.list().map(\.name) == ["v"])
        let report = try Pool.verify(on: SimulatedDevice(image: image))
        #expect(report.problems.contains { $0.code == "journal-synced-damage" })
    }

    /// Goal (item 2, promise 6): a checkpoint root with a valid checksum whose block id
    /// limit no block-table page justifies is `corrupt(checkpoint)` at once, before any
    /// id-indexed array is sized from it; verify reports it and keeps going. Method: a
    /// sparse 1 TiB pool file, root rewritten with an empty block table of height 5 and
    /// blockIDLimit = capacity/512 + 1 (before the fix: ~60 GB allocated, SIGABRT).
    @Test("a crafted root with a huge block id limit is corrupt(checkpoint), not an 8 GB allocation")
    func craftedRootBlockIDLimit() throws {
        let path = NSTemporaryDirectory() + "logpool-crafted-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).pool"
        defer { unlink(path) }
        let capacity: UInt64 = 1 << 40
        try Pool.create(at: path, capacity: capacity, compression: .none).close()
        let device = try FileDevice(path: path, mode: .readWrite)
        try craftRoot(device) { root, _ in
            root.blockTableRoot = .none
            root.blockTableHeight = 5
            root.blockIDLimit = capacity / 512 + 1
            // A refcount tree tall enough for the limit, so the root decodes (C-9) and
            // open's C-6 check is what refuses it.
            root.refcountHeight = CheckpointRoot.refcountHeight(coveringBlockIDLimit: root.blockIDLimit)
        }
        device.closeDescriptor()
        expectCorrupt(structure: "checkpoint", detailContains: "C-6") { _ = try Pool.open(at: path, mode: .readOnly) }
        expectCorrupt(structure: "checkpoint", detailContains: "C-6") { _ = try Pool.open(at: path) }
        let report = try Pool.verify(at: path)
        #expect(report.problems.contains { $0.code == "checkpoint-damaged" && $0.detail.contains("C-6") }, "\(report.problems)")
    }

    /// Goal (item 2, replay half): a journal record naming a new block id far beyond the
    /// id space the writer could have reserved is `corrupt(journal record)`, not an
    /// array of that many entries. Method: apply crafted map intents as replay does.
    @Test("a replayed record with a block id beyond the reservable id space is corrupt")
    func replayedBlockIDBeyondIDSpace() throws {
        let (pool, _) = try makePool()
        try pool.createVolume(name: "v", size: 16 * 4096)
        let engine = pool.engine
        let id = engine.catalog.volume(named: "v")!.record.id
        let location = BlockLocation(byteOffset: engine.geometry.dataAreaByteOffset + 4096, storedByteCount: 4096, flags: 0, checksum: 1)
        let before = engine.ids.limit
        for blockID in [engine.geometry.capacityByteCount / 512, 1 << 20, UInt64(before) + 100_000] {
            expectCorrupt(structure: "journal record", detailContains: "out of range") {
                try engine.apply(.map(volumeID: id, unmapRanges: [], mappings: [BlockMapping(blockIndex: 0, blockID: blockID, location: location)]))
            }
        }
        #expect(engine.ids.limit == before)
        #expect(pool.internalConsistencyProblems() == [])
    }

    /// Goal (item 5): a map whose interior slots point to one child (valid checksums)
    /// breaks P-4. Interior pages are read at open, which refuses a DAG of them, so no
    /// walk (`list`'s space figures) visits a page more than 254 times per map. Leaves
    /// get nodes on first use (COMMIT §3.2): open counts their pages from the pointers
    /// and refuses more pages than a segment holds; the first use finds a leaf named
    /// twice and refuses it and every later call, before anything is written. Method:
    /// a volume of height 2, its root's first `duplicates` child pointers all set to
    /// child 0, root and superblock rewritten with valid checksums.
    @Test("a map DAG (one leaf under many interior slots) is refused at open or on first use, before any change",
          arguments: [254, 2])
    func mapDAGRefused(duplicates: Int) throws {
        let (pool, device) = try makePool()
        let v = try pool.createVolume(name: "v", size: 600 * 4096)  // 600 blocks: height 2
        try v.write(at: 0, from: pattern(4096, seed: 3))
        try pool.close()
        let crafted = SimulatedDevice(image: device.currentImage)
        try craftRoot(crafted) { root, sb in
            let index = try #require(root.volumes.firstIndex { $0.name == "v" })
            let record = root.volumes[index]
            #expect(record.mapHeight == 2)
            var words = try PageLayout.decode(try crafted.read(byteCount: PoolGeometry.pageByteCount, at: record.mapRoot.byteOffset),
                                              kind: .map, level: 1, expectedChecksum: record.mapRoot.checksum, salt: sb.poolSalt,
                                              byteOffset: record.mapRoot.byteOffset)
            for i in 1..<duplicates {
                words[2 * i] = words[0]
                words[2 * i + 1] = words[1]
            }
            let (bytes, checksum) = PageLayout.encode(kind: .map, level: 1, words: words, salt: sb.poolSalt)
            try crafted.write(bytes, at: record.mapRoot.byteOffset)
            root.volumes[index].mapRoot = PagePointer(byteOffset: record.mapRoot.byteOffset, checksum: checksum)
        }
        let image = crafted.currentImage
        let device2 = SimulatedDevice(image: image)
        if duplicates > 16 {
            // More pages than the 64 KiB segment holds.
            expectCorrupt(structure: "checkpoint", detailContains: "P-4") { _ = try Pool.open(on: device2) }
        } else {
            let opened = try Pool.open(on: device2)
            let volume = try opened.openVolume(name: "v")
            // The first read creates the root's leaves and finds the page named twice;
            // it and every later call are refused, naming the page and P-4.
            for attempt in ["read", "write"] {
                do {
                    if attempt == "read" {
                        _ = try volume.read(at: 0, length: 4096)
                    } else {
                        try volume.write(at: 0, from: pattern(4096, seed: 4))
                    }
                    Issue.record("a \(attempt) on a map breaking P-4 was accepted")
                } catch PoolError.poisoned(let cause) {
                    #expect(cause.contains("P-4") && cause.contains("map page"), "\(cause)")
                }
            }
        }
        #expect(device2.currentImage == image, "nothing may be written once P-4 was found broken")
        let report = try Pool.verify(on: SimulatedDevice(image: image))
        #expect(report.problems.contains { $0.code == "page-shared-wrongly" })
    }

    /// Goal (review of COMMIT §3.2): a one-level map's leaf root may be child 0 of a
    /// taller map's level-1 page (growth), nowhere else. Method: `a` of 100 blocks
    /// (height 1) and `b` of 600 (height 2), both written; `b`'s root page made to name
    /// `a`'s root leaf at slot 1 (valid checksums). Open creates that group's leaves at
    /// once and finds the leaf at a second place: every call is refused, naming P-4,
    /// and nothing is written.
    @Test("a leaf root named by another map at a slot other than 0 is refused before any change")
    func leafRootAtOtherSlotRefused() throws {
        let (pool, device) = try makePool()
        try pool.createVolume(name: "a", size: 100 * 4096).write(at: 0, from: pattern(4096, seed: 5))
        try pool.createVolume(name: "b", size: 600 * 4096).write(at: 0, from: pattern(4096, seed: 6))
        try pool.close()
        let crafted = SimulatedDevice(image: device.currentImage)
        try craftRoot(crafted) { root, sb in
            let a = try #require(root.volumes.first { $0.name == "a" })
            let index = try #require(root.volumes.firstIndex { $0.name == "b" })
            let b = root.volumes[index]
            #expect(a.mapHeight == 1 && b.mapHeight == 2)
            var words = try PageLayout.decode(try crafted.read(byteCount: PoolGeometry.pageByteCount, at: b.mapRoot.byteOffset),
                                              kind: .map, level: 1, expectedChecksum: b.mapRoot.checksum, salt: sb.poolSalt,
                                              byteOffset: b.mapRoot.byteOffset)
            words[2] = a.mapRoot.byteOffset
            words[3] = a.mapRoot.checksum
            let (bytes, checksum) = PageLayout.encode(kind: .map, level: 1, words: words, salt: sb.poolSalt)
            try crafted.write(bytes, at: b.mapRoot.byteOffset)
            root.volumes[index].mapRoot = PagePointer(byteOffset: b.mapRoot.byteOffset, checksum: checksum)
        }
        let image = crafted.currentImage
        let device2 = SimulatedDevice(image: image)
        do {
            let opened = try Pool.open(on: device2)
            for name in ["a", "b"] {
                expectPoolError({ error in
                    guard case .poisoned(let cause) = error else { return false }
                    return cause.contains("P-4")
                }) { _ = try opened.openVolume(name: name).read(at: 0, length: 4096) }
            }
        } catch PoolError.poisoned(let cause) {
            #expect(cause.contains("P-4"), "\(cause)")
        }
        #expect(device2.currentImage == image, "nothing may be written once P-4 was found broken")
        let report = try Pool.verify(on: SimulatedDevice(image: image))
        #expect(report.problems.contains { $0.code == "page-shared-wrongly" }, "\(report.problems.map(\.code))")
    }

    /// Goal (item 3, promise 4): on every small geometry, a volume filled until
    /// `poolFull` can still overwrite large ranges it owns alone, again and again (the
    /// old gross estimate counted 3.5 KiB of alignment padding per 4 KiB block, so a
    /// 1 MiB overwrite asked for 1.9 MiB and failed on 4-24 MiB pools). Method: per
    /// geometry, fill, then overwrite 1 MiB (and 768 KiB, unaligned) ranges 6 times
    /// each at spread offsets, reading every range back.
    @Test("overwriting large exclusive ranges works on a full pool of every small geometry",
          arguments: [(4, 4096, CompressionMode.none), (8, 4096, .none), (8, 512, .none), (16, 4096, .none),
                      (24, 4096, .none), (24, 512, .none), (8, 4096, .lz4), (16, 65536, .none), (4, 1024, .lz4)])
    func overwriteOnFullSmallPool(megabytes: Int, blockSize: Int, compression: CompressionMode) throws {
        let capacity = megabytes << 20
        let device = SimulatedDevice(byteCount: capacity)
        let pool = try Pool.create(on: device, capacity: UInt64(capacity), blockSize: blockSize, compression: compression)
        let v = try pool.createVolume(name: "v", size: UInt64(64 << 20))
        var model = try fillUntilPoolFull(v, chunkByteCount: 1 << 20)
        #expect(model.count >= 1 << 20, "the pool must hold at least one unit")
        // Scatter the free block ids first: random one-block overwrites free random old
        // ids, and once the allocation cursor has swept past the id space's free tail
        // (a quarter of the live ids) new ids come from those scattered holes, so a
        // large overwrite dirties as many block-table leaves as it can.
        var generator = SeededGenerator(seed: UInt64(megabytes * 100_000 + blockSize))
        let blockCount = model.count / blockSize
        for i in 0..<(blockCount / 4 + 300) {
            let block = Int.random(in: 0..<blockCount, using: &generator)
            let data = pattern(blockSize, seed: UInt8(truncatingIfNeeded: i))
            do {
                try v.write(at: UInt64(block * blockSize), from: data)
            } catch {
                Issue.record("\(megabytes) MiB, block \(blockSize), \(compression): one-block overwrite \(i) failed: \(error)")
                return
            }
            model.replaceSubrange(block * blockSize..<(block + 1) * blockSize, with: data)
        }
        for round in 0..<6 {
            for (length, skew) in [(1 << 20, 0), (768 << 10, 3000)] {
                let span = model.count - length
                guard span >= 0 else { continue }
                let offset = span == 0 ? 0 : (round * 7919 * 4096 + skew) % (span + 1)
                let data = pattern(length, seed: UInt8(truncatingIfNeeded: 100 + round * 2 + (skew == 0 ? 0 : 1)))
                do {
                    try v.write(at: UInt64(offset), from: data)
                } catch {
                    Issue.record("\(megabytes) MiB, block \(blockSize), \(compression): overwrite of \(length) at \(offset) (round \(round)) failed: \(error); stats \(pool.stats)")
                    return
                }
                model.replaceSubrange(offset..<offset + length, with: data)
            }
            try pool.sync()
        }
        #expect(try v.read(at: 0, length: model.count) == model)
        try pool.close()
        let problems = try Pool.verify(on: SimulatedDevice(image: device.currentImage)).problems
        #expect(problems.isEmpty, "\(problems)")
        // It reopens (a full pool of 512-byte blocks once stored an id limit above the old
        // capacity/512 bound and could not be opened again).
        let reopened = try Pool.open(on: SimulatedDevice(image: device.currentImage), mode: .readOnly)
        #expect(try reopened.openVolume(name: "v").read(at: 0, length: model.count) == model)
    }

    /// Goal (item 6, library half): `checkRoom` refuses a write that cannot fit whole,
    /// without changing anything, and admits one that fits.
    @Test("checkRoom refuses a write that cannot fit whole and changes nothing")
    func checkRoomBeforeWriting() throws {
        let (pool, device) = try makePool(capacity: 8 << 20)
        let v = try pool.createVolume(name: "v", size: 64 << 20)
        let writesBefore = device.writeCount
        // The refusal names its rule and the pool's figures (issue 14): A-1, nothing live yet.
        expectPoolError({ error in
            guard case .poolFull(_, _, let figures) = error else { return false }
            return figures.rule == .logical && figures.reservedByteCount > 0 && "\(error)".contains("rule A-1")
        }) {
            try v.checkRoom(forWritingAt: 0, byteCount: 10 << 20)
        }
        try v.checkRoom(forWritingAt: 0, byteCount: 2 << 20)
        #expect(device.writeCount == writesBefore)
        #expect(try v.info().mappedBytes == 0)
    }

    /// Goal (item 4, library half; item 7): the pool file never lands on descriptors 0-2,
    /// and a FIFO, a directory or a character device is refused without blocking.
    @Test("FileDevice refuses a FIFO, a directory and a character device, never blocking")
    func fileDeviceRefusesNonFiles() throws {
        let dir = NSTemporaryDirectory() + "logpool-fifo-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fifo = dir + "/ff"
        #expect(mkfifo(fifo, 0o600) == 0)
        for path in [fifo, dir, "/dev/null"] {
            for mode in [OpenMode.readOnly, .readWrite] {
                expectPoolError({ if case .invalidArgument(let m) = $0 { m.contains("regular file") || m.contains("not a pool file") } else { false } }) {
                    _ = try FileDevice(path: path, mode: mode)
                }
            }
        }
    }

    /// Goal (also-fix: names): names that print differently from what they are, or that
    /// collide after a decoder replaced bad bytes, are refused for new volumes.
    @Test("names: . and .., separators, invisible characters and U+FFFD are refused",
          arguments: [".", "..", "a\u{2028}b", "a\u{2029}", "zero\u{200B}width", "rtl\u{202E}x", "bad\u{FFFD}", "\u{E000}"])
    func refusedNames(name: String) throws {
        let (pool, _) = try makePool()
        expectPoolError({ if case .invalidArgument = $0 { true } else { false } }) { try pool.createVolume(name: name, size: 4096) }
        try pool.createVolume(name: "ok", size: 4096)
        expectPoolError({ if case .invalidArgument = $0 { true } else { false } }) { try pool.rename("ok", to: name) }
        expectPoolError({ if case .invalidArgument = $0 { true } else { false } }) { try pool.snapshot(source: "ok", name: name) }
    }
}
