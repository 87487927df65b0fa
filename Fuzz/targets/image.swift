// fuzz-modules: LogPool
// fuzz-sources: Sources/LogPoolTesting/SimulatedDevice.swift
// fuzz-max-len: 4096
//
// Whole pool images: `Pool.verify(on:scrubData: true)` (the checker) and
// `Pool.open(on:mode: .readOnly)` on a mutated image, then `list()`, `openVolume` and
// `read` of every volume (superblock choice, checkpoint and tree loading, refcount/usage
// rebuild, journal replay, block verification, LZ4). When verify reports no error, open
// and every read must succeed.
//
// The image is built once per process, in memory: a 4 MiB pool with 64 KiB segments
// and LZ4; volume "disk" (1 MiB) written with compressible and incompressible blocks,
// checkpointed, snapshot "disk@1", more writes to "disk", clone "dev" of the snapshot
// with a write, volume "wide" (4 MiB: a map of height 2) with blocks in two leaves, a
// checkpoint, one more write, then sync without close (so open replays the journal). Its pool UUID is
// random per process; the layout (offsets) is the same every time.
//
// Input: mode byte, then up to 64 patches, each: offset u32 LE (taken modulo the image
// size), length u16 LE, then that many bytes (clipped to the input's and image's end).
//   mode bit 0  reseal after patching: recompute every checksum the patches broke, walking
//               the structures the way open does: each map/block-table tree from the
//               checkpoint root (page trailers bottom-up, parent pointers' checksums), the
//               checkpoint root and its checksum in each slot, the journal records from each
//               slot's replay offset (J-1/J-2/wrap rules), every segment header with its
//               magic, and both superblock slots
// Properties: never traps; every error thrown is a PoolError; a read-only open does not
// write (SimulatedDevice traps on writes past its end); open refuses what verify calls
// `page-shared-wrongly` or `checkpoint-damaged` (so no walk revisits a page, P-4, and no
// id limit goes unjustified, C-6); no volume lists more mapped bytes than its size; strict mode
// (LOGPOOL_FUZZ_STRICT=1) also requires `internalConsistencyProblems()` to be empty
// after a successful open of a pool verify calls clean (open reads no block-table leaf,
// so damage there or in the stored usage is found on use, and by verify). LOGPOOL_FUZZ_VERBOSE=1 prints the pristine layout and what
// open and each read did (run the binary on one input file to see it).
import LogPool

#if canImport(Glibc)
import Glibc
#endif

private let imageByteCount = 4 << 20

private struct Pristine {
    var image: [UInt8]
    var geometry: PoolGeometry
    var salt: UInt64
}

private func blockPattern(_ seed: UInt64, _ count: Int, compressible: Bool) -> [UInt8] {
    var rng = SeededGenerator(seed: seed)
    if compressible {
        let line = Array("2024-05-01T12:00:07Z INFO request path=/api/v1/items status=200 id=".utf8)
        var out: [UInt8] = []
        while out.count < count { out += line; out += Array(String(rng.next() % 100_000).utf8); out.append(10) }
        return Array(out.prefix(count))
    }
    return (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
}

private let pristine: Pristine = {
    do {
        let device = SimulatedDevice(byteCount: imageByteCount)
        let pool = try Pool.create(on: device, capacity: UInt64(imageByteCount), segmentSize: 64 << 10)
        let disk = try pool.createVolume(name: "disk", size: 1 << 20)
        try disk.write(at: 0, from: blockPattern(1, 16384, compressible: true))
        try disk.write(at: 65536, from: blockPattern(2, 8192, compressible: false))
        try disk.write(at: 1_000_000, from: blockPattern(3, 100, compressible: true))  // unaligned, last blocks
        try pool.checkpoint()
        _ = try pool.snapshot(source: "disk", name: "disk@1")
        try disk.write(at: 4096, from: blockPattern(4, 4096, compressible: false))   // copy-on-write
        try disk.write(at: 300_000, from: blockPattern(5, 12288, compressible: true))
        try disk.discard(at: 65536, length: 4096)
        let dev = try pool.clone(source: "disk@1", name: "dev")
        try dev.write(at: 8192, from: blockPattern(6, 4096, compressible: true))
        // A map of height 2 (1024 blocks: an interior root over two leaves), so patches
        // can make interior pointers repeat (a DAG inside one map, FORMAT P-4).
        let wide = try pool.createVolume(name: "wide", size: 4 << 20)
        try wide.write(at: 0, from: blockPattern(7, 4096, compressible: true))
        try wide.write(at: 600 * 4096, from: blockPattern(8, 4096, compressible: true))
        try pool.checkpoint()
        try wide.write(at: 4096, from: blockPattern(9, 4096, compressible: true))
        try pool.sync()
        let image = device.currentImage
        let sb = try Superblock.decode(Array(image[0..<512]), slotIndex: 0)
        // Harness self-checks, once per process: the image opens read-only with its three
        // volumes, and resealing it unpatched changes nothing (the resealer computes every
        // checksum the way the encoders do).
        let reopened = try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly)
        let names = try reopened.list().map(\.name)
        guard names == ["dev", "disk", "disk@1", "wide"] else { fatalError("pristine image lists \(names)") }
        guard try reopened.openVolume(name: "disk@1").read(at: 0, length: 16384) == blockPattern(1, 16384, compressible: true) else {
            fatalError("pristine image reads back wrong data")
        }
        var resealer = Resealer(image: image, salt: sb.poolSalt, geometry: sb.geometry)
        resealer.sealAll()
        guard resealer.image == image else {
            let first = image.indices.first { resealer.image[$0] != image[$0] } ?? -1
            fatalError("resealing the pristine image changed byte \(first)")
        }
        return Pristine(image: image, geometry: sb.geometry, salt: sb.poolSalt)
    } catch {
        fatalError("image fuzz target: cannot build the pristine image: \(error)")
    }
}()

// MARK: - Resealing

private struct Resealer {
    var image: [UInt8]
    let salt: UInt64
    let geometry: PoolGeometry
    var pageSums: [Int: UInt64] = [:]
    var inProgress: Set<Int> = []
    var rootSums: [Int: UInt64] = [:]

    func inBounds(_ offset: UInt64, _ count: Int) -> Bool {
        offset <= UInt64(image.count) && UInt64(count) <= UInt64(image.count) - offset
    }

    /// Reseals the page at `offset` and, for interior pages, its children first.
    /// Returns the page's new checksum (nil when there is no page there to seal).
    mutating func sealPage(_ offset: UInt64, depth: Int) -> UInt64? {
        guard offset != 0, inBounds(offset, PoolGeometry.pageByteCount) else { return nil }
        let at = Int(offset)
        if let sum = pageSums[at] { return sum }
        if inProgress.contains(at) { return nil }  // a cycle: open must reject it, leave it
        inProgress.insert(at)
        defer { inProgress.remove(at) }
        let level = Int(image[at + 5])
        if level >= 1, level <= PageLayout.heightMax, depth < PageLayout.heightMax {
            for slot in 0..<PageLayout.interiorFanout {
                let word = at + PageLayout.headerByteCount + 16 * slot
                let child = image.le64(at: word)
                if let sum = sealPage(child, depth: depth + 1) { image.put64(sum, at: word + 8) }
            }
        }
        image.seal(from: at, to: at + PageLayout.checksumOffset, seed: salt, at: at + PageLayout.checksumOffset)
        let sum = image.le64(at: at + PageLayout.checksumOffset)
        pageSums[at] = sum
        return sum
    }

    /// Reseals the checkpoint root at [offset, offset+count): its trees, then itself.
    mutating func sealRoot(_ offset: UInt64, _ count: UInt64) -> UInt64? {
        guard count >= UInt64(CheckpointRoot.headerByteCount + 8), count <= 1 << 20, count % 512 == 0,
              inBounds(offset, Int(count)) else { return nil }
        let at = Int(offset), end = at + Int(count)
        if let sum = rootSums[at] { return sum }
        if let sum = sealPage(image.le64(at: at + 32), depth: 0) { image.put64(sum, at: at + 40) }
        if let sum = sealPage(image.le64(at: at + 80), depth: 0) { image.put64(sum, at: at + 88) }
        var row = at + CheckpointRoot.headerByteCount
        let volumeCount = Int(image.le32(at: at + 52))
        for _ in 0..<min(volumeCount, 4096) {
            guard row + 58 <= end - 8 else { break }
            if let sum = sealPage(image.le64(at: row + 40), depth: 0) { image.put64(sum, at: row + 48) }
            row += 58 + Int(image.le16(at: row + 56))
        }
        image.seal(from: at, to: end - 8, seed: salt, at: end - 8)
        let sum = image.le64(at: end - 8)
        rootSums[at] = sum
        return sum
    }

    /// Reseals journal records from `start` in the ring, following the reader's rules.
    mutating func sealJournal(from start: UInt64) {
        let ring = Int(PoolGeometry.journalByteOffset)
        let ringBytes = Int(geometry.journalByteCount)
        guard start < UInt64(ringBytes), ring + ringBytes <= image.count else { return }
        var pos = Int(start), consumed = 0, wraps = 0
        let header = JournalRecordLayout.headerByteCount
        for _ in 0..<20_000 {
            if pos % 512 != 0, 512 - pos % 512 < header { consumed += 512 - pos % 512; pos += 512 - pos % 512 }
            if ringBytes - pos < header { consumed += ringBytes - pos; pos = 0; wraps += 1 }
            guard wraps < 2, consumed < ringBytes else { return }
            let at = ring + pos
            guard image.le32(at: at) == JournalRecordLayout.magic else { return }
            let payload = Int(image.le32(at: at + JournalRecordLayout.payloadByteCountOffset))
            guard payload <= JournalRecordLayout.payloadByteCountMax, pos + header + payload <= ringBytes else { return }
            var record = Array(image[at..<at + header + payload])
            sealJournalRecord(&record, salt: salt)
            image.put64(record.le64(at: JournalRecordLayout.checksumOffset), at: at + JournalRecordLayout.checksumOffset)
            if image.le16(at: at + JournalRecordLayout.kindOffset) == 2 {  // wrap
                consumed += ringBytes - pos; pos = 0; wraps += 1
            } else {
                pos += header + payload; consumed += header + payload
            }
        }
    }

    mutating func sealAll() {
        for s in 0..<Int(geometry.segmentCount) {
            let at = Int(geometry.segmentByteOffset(s))
            guard at + 512 <= image.count, Array(image[at..<at + 8]) == SegmentHeaderLayout.magic else { continue }
            image.seal(from: at, to: at + SegmentHeaderLayout.checksumOffset, seed: 0, at: at + SegmentHeaderLayout.checksumOffset)
        }
        for slot in 0..<2 {
            let base = Int(PoolGeometry.superblockSlotByteOffsets[slot])
            guard Array(image[base..<base + 8]) == SuperblockLayout.magic else { continue }
            sealJournal(from: image.le64(at: base + SuperblockLayout.journalReplayByteOffsetOffset))
            if let sum = sealRoot(image.le64(at: base + SuperblockLayout.checkpointByteOffsetOffset),
                                  image.le64(at: base + SuperblockLayout.checkpointByteCountOffset)) {
                image.put64(sum, at: base + SuperblockLayout.checkpointChecksumOffset)
            }
            image.seal(from: base, to: base + SuperblockLayout.checksumOffset, seed: 0, at: base + SuperblockLayout.checksumOffset)
        }
    }
}

// MARK: - Entry point

/// `LOGPOOL_FUZZ_VERBOSE=1`: say what happened to each input (for reproducers).
private let verbose: Bool = {
    guard let v = getenv("LOGPOOL_FUZZ_VERBOSE") else { return false }
    return String(cString: v) == "1"
}()

private func say(_ message: @autoclosure () -> String) {
    if verbose { print("image: \(message())") }
}

private func describePristine() {
    say("pristine image: \(pristine.image.count) bytes, data area at \(pristine.geometry.dataAreaByteOffset), "
        + "\(pristine.geometry.segmentCount) segments of \(pristine.geometry.segmentByteCount)")
    for slot in 0..<2 {
        let base = Int(PoolGeometry.superblockSlotByteOffsets[slot])
        let i = pristine.image
        say("slot \(slot): generation \(i.le64(at: base + 32)), checkpoint \(i.le64(at: base + 88))+\(i.le64(at: base + 96)), "
            + "journal replay at ring offset \(i.le64(at: base + 112)) (file \(8192 + i.le64(at: base + 112))), flags \(i.le32(at: base + 136))")
    }
}

private func exercise(_ image: [UInt8]) {
    func expectPoolError(_ error: any Error, _ what: String) {
        say("\(what): \(error)")
        fuzzCheck(error is PoolError, "\(what) threw a \(type(of: error)), not a PoolError: \(error)")
    }
    // The checker on the same bytes: whatever it finds comes out as a report or a
    // PoolError, and when it reports no error, opening and reading everything must work
    // (scrub read every live block of the state recovery builds).
    // One device for both: verify and a read-only open never write.
    let device = SimulatedDevice(image: image)
    var verifiedClean = false
    var structuralFindings: [String] = []
    do {
        let report = try Pool.verify(on: device, scrubData: true)
        verifiedClean = report.isClean
        // What open must refuse too: a page shared within one map or by the block table
        // (P-2..P-4), a checkpoint root no pages justify (C-6).
        structuralFindings = report.problems.filter { $0.code == "page-shared-wrongly" || $0.code == "checkpoint-damaged" }
            .map(\.description)
        say("verify: \(report.errorCount) errors, \(report.warningCount) warnings: \(report.problems.prefix(3))")
    } catch {
        expectPoolError(error, "verify")
    }
    let pool: Pool
    do {
        pool = try Pool.open(on: device, mode: .readOnly)
    } catch {
        expectPoolError(error, "open")
        fuzzCheck(!verifiedClean, "verify reported no error but open failed: \(error)")
        return
    }
    say("opened: generation \(pool.stats.generation), recovery \(pool.recoveryReport)")
    fuzzCheck(structuralFindings.isEmpty, "open accepted what verify calls structural damage: \(structuralFindings.prefix(2))")
    _ = pool.stats
    _ = pool.recoveryReport
    do {
        for info in try pool.list() {
            do {
                let volume = try pool.openVolume(name: info.name)
                let size = volume.size
                let chunk: UInt64 = 65536
                var offset: UInt64 = 0
                while offset < min(size, 2 << 20) {
                    _ = try volume.read(at: offset, length: Int(min(chunk, size - offset)))
                    offset += chunk
                }
                if size > 2 << 20 { _ = try volume.read(at: size - 4096, length: 4096) }
                say("read \(info.name) (\(info.kind), \(size) bytes, \(info.mappedBytes) mapped)")
                // Each page is walked once per map (P-4), so the space walk cannot count
                // more blocks than the volume has.
                fuzzCheck(info.mappedBytes <= info.sizeBytes, "\(info.name): \(info.mappedBytes) bytes mapped in a volume of \(info.sizeBytes)")
                _ = try volume.info()
            } catch {
                expectPoolError(error, "reading volume \(info.name)")
                fuzzCheck(!verifiedClean, "verify reported no error but reading \(info.name) failed: \(error)")
            }
        }
    } catch {
        expectPoolError(error, "list")
    }
    if fuzzStrict {
        // Open reads no block-table leaf for usage (COMMIT §4 step 4), so damage in a
        // leaf or in the stored usage is found on use, not at open: an inconsistent
        // opened pool is allowed only where verify reports the damage.
        let problems = pool.internalConsistencyProblems()
        fuzzCheck(problems.isEmpty || !verifiedClean, "verify reported no error, yet the opened pool is inconsistent: \(problems.prefix(5))")
    }
    do { try pool.close() } catch { expectPoolError(error, "close") }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = fuzzBytes(data, size)
    guard let first = input.first else { return 0 }
    let mode = FuzzMode(raw: first)
    if verbose { describePristine() }
    var image = pristine.image
    var i = 1, patches = 0
    while i + 6 <= input.count, patches < 64 {
        let offset = Int(input.le32(at: i) % UInt32(image.count))
        let length = Int(input.le16(at: i + 4))
        i += 6
        let count = min(length, input.count - i, image.count - offset)
        if count > 0 { image.replaceSubrange(offset..<offset + count, with: input[i..<i + count]) }
        i += max(count, 0)
        patches += 1
    }
    if mode.fixChecksum {
        var resealer = Resealer(image: image, salt: pristine.salt, geometry: pristine.geometry)
        resealer.sealAll()
        image = resealer.image
    }
    exercise(image)
    return 0
}
