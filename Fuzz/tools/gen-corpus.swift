// Writes the seed corpora in Fuzz/Corpus/<target>/: valid encodings of every on-disk
// structure, each behind the mode (and selector) bytes its target reads first.
// Build and run with `Fuzz/build.sh --corpus` (deterministic: the files only change when
// the encoders or this file change).
import LogPoolFormat

#if canImport(Glibc)
import Glibc
#endif

@main
struct GenCorpus {
    static var root = "Fuzz/Corpus"
    static var written = 0

    static func write(_ target: String, _ name: String, _ bytes: [UInt8]) {
        let dir = "\(root)/\(target)"
        mkdir(root, 0o755)
        mkdir(dir, 0o755)
        let path = "\(dir)/\(name)"
        guard let f = fopen(path, "wb") else { fatalError("cannot write \(path)") }
        let n = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
        fclose(f)
        guard n == bytes.count else { fatalError("short write to \(path)") }
        written += 1
    }

    static func main() {
        if CommandLine.arguments.count > 1 { root = CommandLine.arguments[1] }
        superblocks()
        journalRecords()
        pages()
        checkpointRoots()
        segmentHeaders()
        lz4Blocks()
        imagePatches()
        print("gen-corpus: wrote \(written) files under \(root)")
    }

    static let uuid = FuzzFixture.poolUUID
    static let salt = FuzzFixture.salt
    static let g = FuzzFixture.geometry

    // MARK: superblock (mode bit 0 fix checksum, bit 1 slot B, bit 2 pair)

    static func slot(_ generation: UInt64, parent: UInt64 = 0, flags: UInt32 = 0,
                     compression: CompressionMode = .lz4, replay: UInt64 = 0) -> Superblock {
        Superblock(slotIndex: Int(generation % 2), poolUUID: uuid, generation: generation, geometry: g,
                   compression: compression,
                   checkpointByteOffset: FuzzFixture.payloadOffset(g, segment: 1, page: 0), checkpointByteCount: 1024,
                   checkpointChecksum: 0x1234_5678_9ABC_DEF0, journalReplayByteOffset: replay,
                   journalReplaySequence: generation * 10, parentChecksum: parent, flags: flags,
                   createdTime: 1_700_000_000)
    }

    static func superblocks() {
        for generation: UInt64 in [2, 3, 4, 6] {
            do { _ = try Superblock.decode(slot(generation).encode(), slotIndex: Int(generation % 2)) }
            catch { fatalError("superblock seed does not decode: \(error)") }
        }
        let a = slot(2), b = slot(3, parent: slot(2).checksum, flags: Superblock.flagMounted, replay: 4096)
        write("superblock", "slot-a", [0x00] + a.encode())
        write("superblock", "slot-a-fix", [0x01] + slot(4, compression: .none).encode())
        write("superblock", "slot-b", [0x02] + b.encode())
        write("superblock", "slot-b-fix", [0x03] + b.encode())
        write("superblock", "pair", [0x04] + a.encode() + b.encode())
        write("superblock", "pair-fix-stale", [0x05] + slot(6).encode() + slot(3).encode())
    }

    // MARK: journal-record (mode bit 0 fix length + checksum, bit 1 header too)

    static func journalRecords() {
        let loc = BlockLocation(byteOffset: FuzzFixture.payloadOffset(g, segment: 2, page: 3), storedByteCount: 4096,
                                flags: 0, checksum: 0xDEAD_BEEF)
        let zloc = BlockLocation(byteOffset: FuzzFixture.payloadOffset(g, segment: 2, page: 4), storedByteCount: 700,
                                 flags: BlockLocation.flagCompressed, checksum: 0xFEED_F00D)
        let intents: [(String, JournalIntent)] = [
            ("padding", .padding(byteCount: 72)),
            ("wrap", .wrap),
            ("create-volume", .createVolume(id: 1, name: "disk", sizeByteCount: 1 << 20, createdTime: 1_700_000_000)),
            ("branch-snapshot", .branch(id: 2, sourceID: 1, kind: .snapshot, name: "disk@monday", createdTime: 1_700_000_100)),
            ("branch-clone", .branch(id: 3, sourceID: 2, kind: .volume, name: "dev", createdTime: 1_700_000_200)),
            ("delete", .delete(id: 2)),
            ("release-queued", .releaseQueued(id: 2, upTo: 509 * 16)),
            ("rename", .rename(id: 3, name: "dév-2")),
            ("resize", .resize(id: 1, sizeByteCount: 2 << 20)),
            ("map", .map(volumeID: 1, unmapRanges: [0..<4, 10..<12],
                         mappings: [BlockMapping(blockIndex: 0, blockID: 7, location: loc),
                                    BlockMapping(blockIndex: 11, blockID: 8, location: zloc)])),
            ("map-discard", .map(volumeID: 3, unmapRanges: [5..<9], mappings: [])),
            ("relocate", .relocate([BlockRelocation(blockID: 7, location: zloc), BlockRelocation(blockID: 8, location: loc)])),
            ("map-run", .mapRun(volumeID: 1, firstBlockIndex: 16, firstBlockID: 20, firstByteOffset: loc.byteOffset,
                                storedByteCount: 4096, checksums: [1, 2, 3, 4])),
        ]
        for (i, (name, intent)) in intents.enumerated() {
            let record = JournalRecord(sequence: 100 + UInt64(i), epoch: 4, durableSequence: 99 + UInt64(i), intent: intent)
            let bytes = record.encode(salt: salt)
            do { let back = try JournalRecord.decode(bytes, salt: salt, byteOffset: 0); precondition(back == record) }
            catch { fatalError("journal seed \(name) does not decode: \(error)") }
            write("journal-record", name, [0x01] + bytes)
            if i % 4 == 2 { write("journal-record", name + ".raw", [0x02] + bytes) }
        }
    }

    // MARK: page (mode bit 0 fix checksum, bit 1 fix header; selector bit 0 kind, bits 1-3 level)

    static func pages() {
        func emit(_ name: String, _ kind: PageKind, levelIndex: UInt8, level: Int, words: [UInt64], mode: UInt8 = 0x01) {
            let (bytes, _) = PageLayout.encode(kind: kind, level: level, words: words, salt: salt)
            let selector = (kind == .map ? 0 : kind == .blockTable ? 1 : 0x10) | levelIndex << 1
            write("page", name, [mode, selector] + bytes)
        }
        var mapLeaf = [UInt64](repeating: 0, count: PageLayout.mapLeafFanout)
        for i in 0..<40 { mapLeaf[i * 3] = UInt64(i + 1) }
        mapLeaf[PageLayout.mapLeafFanout - 1] = 999
        emit("map-leaf", .map, levelIndex: 0, level: 0, words: mapLeaf)
        emit("map-leaf.raw", .map, levelIndex: 0, level: 0, words: mapLeaf, mode: 0x00)

        func interior(_ children: Int, seed: UInt64) -> [UInt64] {
            var words = [UInt64](repeating: 0, count: PageLayout.interiorFanout * 2)
            for i in 0..<children {
                words[2 * i * 5] = FuzzFixture.payloadOffset(g, segment: 2, page: i)
                words[2 * i * 5 + 1] = seed &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(i)
            }
            return words
        }
        emit("map-interior-1", .map, levelIndex: 1, level: 1, words: interior(3, seed: 1))
        emit("map-interior-2", .map, levelIndex: 2, level: 2, words: interior(1, seed: 2))

        var btLeaf = [UInt64](repeating: 0, count: PageLayout.blockTableLeafFanout * 3)
        for i in 0..<20 {
            btLeaf[3 * i] = FuzzFixture.payloadOffset(g, segment: 3, page: i)
            let compressed = i % 3 == 0
            btLeaf[3 * i + 1] = UInt64(compressed ? 1500 : 4096) | UInt64(compressed ? 1 : 0) << 32
            btLeaf[3 * i + 2] = 0xC0FF_EE00 &+ UInt64(i)
        }
        emit("block-table-leaf", .blockTable, levelIndex: 0, level: 0, words: btLeaf)
        emit("block-table-interior-1", .blockTable, levelIndex: 1, level: 1, words: interior(2, seed: 3))
        emit("block-table-interior-3.header", .blockTable, levelIndex: 3, level: 3, words: interior(1, seed: 4), mode: 0x03)

        // Refcount leaves: two 32-bit counts per word, the even id low (FORMAT §5.4).
        var refcountLeaf = [UInt64](repeating: 0, count: PageLayout.wordCapacity)
        for i in 0..<30 { refcountLeaf[i] = UInt64(i % 3 + 1) | UInt64(i % 2) << 32 }
        refcountLeaf[0] &= ~0xFFFF_FFFF  // id 0 is never referenced
        emit("refcount-leaf", .refcounts, levelIndex: 0, level: 0, words: refcountLeaf)
        emit("refcount-leaf.raw", .refcounts, levelIndex: 0, level: 0, words: refcountLeaf, mode: 0x00)
        emit("refcount-interior-1", .refcounts, levelIndex: 1, level: 1, words: interior(2, seed: 5))
    }

    // MARK: checkpoint-root (mode bit 0 fix checksum, bit 1 fix layout; selector = geometry)

    static func checkpointRoots() {
        func emit(_ name: String, geometryIndex: UInt8, volumes: [VolumeRecord], nextID: UInt64, mode: UInt8 = 0x01,
                  queue: [QueuedMapRecord] = [], live: UInt64 = 0) {
            let geometry = FuzzFixture.geometries[Int(geometryIndex)]
            let usage = (0..<Int(geometry.segmentCount)).map { UInt64($0 % 5) * 4096 }
            let root = CheckpointRoot(
                generation: 6, nextVolumeID: nextID,
                blockTableRoot: PagePointer(byteOffset: FuzzFixture.payloadOffset(geometry, segment: 1, page: 2), checksum: 0xB7),
                blockTableHeight: 1, blockIDLimit: 42, volumes: volumes, segmentLiveByteCounts: usage,
                refcountRoot: PagePointer(byteOffset: FuzzFixture.payloadOffset(geometry, segment: 1, page: 5), checksum: 0xC3),
                refcountHeight: 1, liveBlockCount: live, releaseQueue: queue)
            let (bytes, sum) = root.encode(salt: salt)
            do {
                let back = try CheckpointRoot.decode(bytes, expectedChecksum: sum, salt: salt,
                                                     byteOffset: FuzzFixture.payloadOffset(geometry, segment: 1, page: 0), geometry: geometry)
                precondition(back == root, "checkpoint seed \(name) does not round trip")
            } catch { fatalError("checkpoint seed \(name) does not decode: \(error)") }
            write("checkpoint-root", name, [mode, geometryIndex] + bytes)
        }
        func volume(_ id: UInt64, _ kind: VolumeKind, _ name: String, size: UInt64, origin: UInt64 = 0,
                    geometry: PoolGeometry, page: Int) -> VolumeRecord {
            let blocks = size / UInt64(geometry.blockByteCount)
            return VolumeRecord(id: id, kind: kind, name: name, sizeByteCount: size, createdTime: 1_700_000_000 + Int64(id),
                                originID: origin,
                                mapRoot: page < 0 ? .none : PagePointer(byteOffset: FuzzFixture.payloadOffset(geometry, segment: 1, page: page), checksum: 0xA0 + id),
                                mapHeight: PageLayout.height(kind: .map, coveringSlotCount: blocks))
        }
        let g0 = FuzzFixture.geometries[0], g1 = FuzzFixture.geometries[1]
        emit("two-volumes", geometryIndex: 0, volumes: [
            volume(1, .volume, "disk", size: 1 << 20, geometry: g0, page: 3),
            volume(2, .snapshot, "disk@monday", size: 1 << 20, origin: 1, geometry: g0, page: 3),
        ], nextID: 3)
        emit("two-volumes.raw", geometryIndex: 0, volumes: [
            volume(1, .volume, "disk", size: 1 << 20, geometry: g0, page: 3),
            volume(2, .snapshot, "disk@monday", size: 1 << 20, origin: 1, geometry: g0, page: 3),
        ], nextID: 3, mode: 0x00)
        emit("three-volumes-512", geometryIndex: 1, volumes: [
            volume(1, .volume, "a", size: 512 * 600, geometry: g1, page: 4),  // needs a 2-level map
            volume(4, .snapshot, "a@1", size: 512 * 600, origin: 1, geometry: g1, page: 4),
            volume(5, .volume, "clone-of-a", size: 1 << 30, origin: 4, geometry: g1, page: -1),
        ], nextID: 9)
        emit("release-queue-512", geometryIndex: 1, volumes: [
            volume(1, .volume, "a", size: 512 * 600, geometry: g1, page: 4),
        ], nextID: 7, queue: [
            QueuedMapRecord(id: 3, mapRoot: PagePointer(byteOffset: FuzzFixture.payloadOffset(g1, segment: 1, page: 6), checksum: 0xD1),
                            mapHeight: 2, releasedSlotCount: 509),
            QueuedMapRecord(id: 5, mapRoot: PagePointer(byteOffset: FuzzFixture.payloadOffset(g1, segment: 1, page: 4), checksum: 0xA1),
                            mapHeight: 2, releasedSlotCount: 0),
        ], live: 30)
        emit("empty", geometryIndex: 3, volumes: [], nextID: 1, mode: 0x03)
    }

    // MARK: segment-header (mode bit 0 fix checksum, bit 1 fix magic)

    static func segmentHeaders() {
        write("segment-header", "segment-0", [0x01] + SegmentHeader(poolUUID: uuid, segmentIndex: 0, generation: 2).encode())
        write("segment-header", "segment-5.raw", [0x00] + SegmentHeader(poolUUID: uuid, segmentIndex: 5, generation: 7).encode())
    }

    // MARK: lz4-block (selector % 16 = block size; mode bit 1 round trip)

    static func logText(_ byteCount: Int) -> [UInt8] {
        var out: [UInt8] = []
        var i = 0
        while out.count < byteCount {
            out += Array("2024-05-0\(i % 9 + 1)T12:\(10 + i % 50):07Z INFO request id=\(i &* 7919 % 100_000) path=/api/v1/items status=200\n".utf8)
            i += 1
        }
        return Array(out.prefix(byteCount))
    }

    static func lz4Blocks() {
        func compressed(_ block: [UInt8]) -> [UInt8] {
            guard let c = block.withUnsafeBytes({ BlockCompression.compress($0, limitByteCount: block.count) }) else {
                fatalError("seed block does not compress")
            }
            return c
        }
        write("lz4-block", "log-4096", [0x00, 3] + compressed(logText(4096)))
        write("lz4-block", "log-512", [0x00, 0] + compressed(logText(512)))
        write("lz4-block", "zeros-65536", [0x00, 7] + compressed([UInt8](repeating: 0, count: 65536)))
        var mixed = logText(8192)
        for i in stride(from: 0, to: mixed.count, by: 97) { mixed[i] = UInt8(truncatingIfNeeded: i &* 31) }
        write("lz4-block", "mixed-8192", [0x00, 4] + compressed(mixed))
        write("lz4-block", "roundtrip-log", [0x02, 0] + logText(600))
    }

    // MARK: image (mode bit 0 reseal checksums; then patches: u32 offset, u16 length, bytes)

    static func imagePatches() {
        func patch(_ offset: UInt32, _ bytes: [UInt8]) -> [UInt8] {
            var w = ByteWriter()
            w.u32(offset); w.u16(UInt16(bytes.count)); w.append(bytes)
            return w.bytes
        }
        let dataArea = UInt32(g.dataAreaByteOffset)
        write("image", "pristine", [0x00])
        write("image", "pristine-resealed", [0x01])
        write("image", "slot-a-generation", [0x01] + patch(32, [0x10]))
        write("image", "slot-b-flags", [0x01] + patch(4096 + 136, [0x00]))
        write("image", "journal-first-record", [0x01] + patch(8192 + 16, [0x05]))
        write("image", "segment-0-header", [0x01] + patch(dataArea + 24, [0x01]))
        write("image", "segment-1-page", [0x01] + patch(dataArea + 65536 + 4096 + 20, [0xFF, 0x7F]))
        write("image", "two-patches-raw", [0x00] + patch(40, [0, 0, 0x40]) + patch(dataArea + 4096, [1, 2, 3, 4]))
    }
}
