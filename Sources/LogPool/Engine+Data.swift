import Dispatch
import LogPoolFormat

/// One encoded block ready to append.
struct EncodedBlock {
    var stored: [UInt8]
    var flags: UInt32
    var checksum: UInt64
    var allocatedByteCount: Int { Int(sectorAligned(UInt64(stored.count))) }
}

/// Slots filled in parallel, each by exactly one worker, then read once all are done.
final class SharedSlots<T>: @unchecked Sendable {
    private let storage: UnsafeMutableBufferPointer<T?>

    init(count: Int) {
        storage = .allocate(capacity: count)
        storage.initialize(repeating: nil)
    }

    deinit {
        storage.deinitialize()
        storage.deallocate()
    }

    func set(_ index: Int, _ value: T) { storage[index] = value }

    func take() -> [T] { storage.map { $0! } }
}

/// Coalesces writes to adjacent offsets into single `pwrite`s.
struct WriteBatch {
    private(set) var runs: [(byteOffset: UInt64, bytes: [UInt8])] = []

    mutating func add(_ bytes: [UInt8], at byteOffset: UInt64) {
        if let last = runs.last, last.byteOffset + UInt64(last.bytes.count) == byteOffset, last.bytes.count < 8 << 20 {
            runs[runs.count - 1].bytes.append(contentsOf: bytes)
        } else {
            runs.append((byteOffset, bytes))
        }
    }

    func write(to device: BlockDevice) throws {
        for run in runs { try device.write(run.bytes, at: run.byteOffset) }
    }
}

extension Engine {
    /// Largest single write that is atomic across a crash (Specs/COMMIT.md §5).
    static let atomicUnitByteCount = 1 << 20

    // MARK: - Space

    /// Reserves `byteCount` (sector multiple, at most one segment payload) in the open
    /// segment, opening the lowest free segment when the open one is too full. The caller
    /// has checked that space exists; running out here is a bug.
    func allocateExtent(byteCount: Int, batch: inout WriteBatch) -> UInt64 {
        precondition(byteCount % PoolGeometry.sectorByteCount == 0 && UInt64(byteCount) <= geometry.segmentPayloadByteCount)
        if let open = openSegment {
            let end = geometry.segmentByteOffset(open) + UInt64(geometry.segmentByteCount)
            if appendByteOffset + UInt64(byteCount) <= end {
                defer { appendByteOffset += UInt64(byteCount) }
                return appendByteOffset
            }
            segmentStates[open] = .used
            openSegment = nil
        }
        guard let next = freeSegments.popLast() else {
            preconditionFailure("no free segment: admission must have reserved space")
        }
        segmentStates[next] = .open
        openSegment = next
        let start = geometry.segmentByteOffset(next)
        batch.add(SegmentHeader(poolUUID: superblock.poolUUID, segmentIndex: UInt32(next), generation: superblock.generation).encode(), at: start)
        appendByteOffset = start + UInt64(PoolGeometry.segmentHeaderByteCount) + UInt64(byteCount)
        return start + UInt64(PoolGeometry.segmentHeaderByteCount)
    }

    /// Makes sure `dataByteCount` new bytes plus `pageCount` newly dirtied pages fit while
    /// keeping the reserve and room for the next checkpoint: first as things are, then
    /// after a checkpoint (which frees dead segments), then after compaction. Throws
    /// ``PoolError/poolFull(neededByteCount:availableByteCount:)`` having changed nothing
    /// the user can see (a checkpoint or compaction only moves data).
    func ensureSpace(dataByteCount: UInt64, pageCount: Int) throws {
        let slack = UInt64(blockByteCount + PoolGeometry.pageByteCount)
        func need() -> UInt64 {
            dataByteCount + UInt64(pageCount) * UInt64(PoolGeometry.pageByteCount) + checkpointNeedByteCount + slack
        }
        func fits() -> Bool { appendableByteCount >= need() + reserveByteCount }
        if fits() { return }
        if hasSegmentsToFreeAtCheckpoint {
            try checkpoint()
            if fits() { return }
        }
        while !fits() {
            guard try compactOneSegment() else { break }
        }
        if fits() { return }
        let available = appendableByteCount > reserveByteCount + checkpointNeedByteCount + slack
            ? appendableByteCount - reserveByteCount - checkpointNeedByteCount - slack : 0
        throw PoolError.poolFull(neededByteCount: dataByteCount + UInt64(pageCount) * UInt64(PoolGeometry.pageByteCount),
                                 availableByteCount: available)
    }

    /// True when a checkpoint would free at least one segment.
    var hasSegmentsToFreeAtCheckpoint: Bool {
        for s in 0..<segmentStates.count where segmentStates[s] == .used {
            if dataLiveByteCounts[s] == 0 && metaLiveByteCounts[s] == 0 { return true }
        }
        return !pendingPageReleases.isEmpty
    }

    /// Makes room in the journal ring for a record, checkpointing when it is too full.
    func ensureJournalSpace(payloadByteCount: Int) throws {
        let worst = JournalWriter.worstCaseByteCount(payloadByteCount: payloadByteCount)
        if journal.freeByteCount < worst || journal.usedByteCount > journal.ringByteCount / 2 {
            try checkpoint()
        }
    }

    /// Journals `intent` (buffered; durable at the next sync) and applies it.
    func journalAndApply(_ intent: JournalIntent) throws {
        if let flushed = journal.append(intent) {
            try deviceCall { try device.write(flushed.bytes, at: PoolGeometry.journalByteOffset + flushed.ringByteOffset) }
        }
        if journal.buffer.byteCount >= 1 << 20, let early = journal.takeFullSectors() {
            try deviceCall { try device.write(early.bytes, at: PoolGeometry.journalByteOffset + early.ringByteOffset) }
        }
        try apply(intent)
    }

    // MARK: - Encoding blocks

    static func encode(_ block: UnsafeRawBufferPointer, compression: CompressionMode) -> EncodedBlock {
        if compression == .lz4 {
            // Store compressed only when that saves at least one sector.
            let limit = Int(sectorAligned(UInt64(block.count))) - PoolGeometry.sectorByteCount + 1
            if let packed = BlockCompression.compress(block, limitByteCount: limit),
               sectorAligned(UInt64(packed.count)) < sectorAligned(UInt64(block.count)) {
                return EncodedBlock(stored: packed, flags: BlockLocation.flagCompressed, checksum: Checksum.xxh3(packed))
            }
        }
        let bytes = Array(block)
        return EncodedBlock(stored: bytes, flags: 0, checksum: Checksum.xxh3(block))
    }

    /// Encodes many blocks, on both cores when compressing a large write.
    func encodeAll(_ blocks: [[UInt8]]) -> [EncodedBlock] {
        let mode = compression
        if mode == .lz4 && blocks.count >= 16 {
            // Each chunk writes only its own slots of the shared buffer.
            let results = SharedSlots<EncodedBlock>(count: blocks.count)
            let chunks = 8
            let per = (blocks.count + chunks - 1) / chunks
            DispatchQueue.concurrentPerform(iterations: chunks) { chunk in
                let lower = chunk * per, upper = min(blocks.count, lower + per)
                guard lower < upper else { return }
                for i in lower..<upper { results.set(i, blocks[i].withUnsafeBytes { Engine.encode($0, compression: mode) }) }
            }
            return results.take()
        }
        return blocks.map { $0.withUnsafeBytes { Engine.encode($0, compression: mode) } }
    }

    // MARK: - Reading blocks

    /// Reads and checks block `id` into `destination` (exactly one block).
    func readBlock(_ id: UInt64, into destination: UnsafeMutableRawBufferPointer) throws {
        let location = blockLocation(id)
        let stored = try deviceCall { try device.read(byteCount: Int(location.storedByteCount), at: location.byteOffset) }
        let sum = Checksum.xxh3(stored)
        guard sum == location.checksum else {
            throw PoolError.corrupt(structure: "data block", byteOffset: location.byteOffset,
                                    detail: "block id \(id): checksum mismatch: expected \(hex(location.checksum)), found \(hex(sum))")
        }
        if location.isCompressed {
            let ok = stored.withUnsafeBytes { BlockCompression.decompress($0, into: destination) }
            guard ok else {
                throw PoolError.corrupt(structure: "data block", byteOffset: location.byteOffset,
                                        detail: "block id \(id): LZ4 data does not expand to \(destination.count) bytes")
            }
        } else {
            guard stored.count == destination.count else {
                throw PoolError.corrupt(structure: "data block", byteOffset: location.byteOffset,
                                        detail: "block id \(id): stored \(stored.count) bytes uncompressed, expected \(destination.count)")
            }
            stored.withUnsafeBytes { destination.copyMemory(from: $0) }
        }
    }

    /// Reads `destination.count` bytes of `volume` from `byteOffset` (range checked by the
    /// caller). Runs of whole, uncompressed, physically adjacent blocks are read with one
    /// `pread` and then checked block by block.
    func read(_ volume: VolumeState, byteOffset: UInt64, into destination: UnsafeMutableRawBufferPointer) throws {
        let bs = UInt64(blockByteCount)
        var done = 0
        var scratch = [UInt8](repeating: 0, count: blockByteCount)
        while done < destination.count {
            let position = byteOffset + UInt64(done)
            let blockIndex = position / bs
            let inBlock = Int(position % bs)
            let take = min(blockByteCount - inBlock, destination.count - done)
            let id = mapLookup(volume.map, blockIndex: blockIndex)
            if id == 0 {
                UnsafeMutableRawBufferPointer(rebasing: destination[done..<done + take]).initializeMemory(as: UInt8.self, repeating: 0)
                done += take
                continue
            }
            let location = blockLocation(id)
            if inBlock == 0 && take == blockByteCount && !location.isCompressed {
                // Extend the run while the next blocks are whole, uncompressed and adjacent.
                var run: [(UInt64, BlockLocation)] = [(id, location)]
                var next = blockIndex + 1
                while (run.count + 1) * blockByteCount <= destination.count - done, run.count < 256 {
                    let nextID = mapLookup(volume.map, blockIndex: next)
                    guard nextID != 0 else { break }
                    let nextLocation = blockLocation(nextID)
                    guard !nextLocation.isCompressed,
                          nextLocation.byteOffset == location.byteOffset + UInt64(run.count * blockByteCount)
                    else { break }
                    run.append((nextID, nextLocation))
                    next += 1
                }
                let span = UnsafeMutableRawBufferPointer(rebasing: destination[done..<done + run.count * blockByteCount])
                try deviceCall { try device.read(into: span, at: location.byteOffset) }
                for (i, (runID, runLocation)) in run.enumerated() {
                    let piece = UnsafeRawBufferPointer(rebasing: span[(i * blockByteCount)..<((i + 1) * blockByteCount)])
                    let sum = Checksum.xxh3(piece)
                    guard sum == runLocation.checksum else {
                        throw PoolError.corrupt(structure: "data block", byteOffset: runLocation.byteOffset,
                                                detail: "block id \(runID): checksum mismatch: expected \(hex(runLocation.checksum)), found \(hex(sum))")
                    }
                }
                done += run.count * blockByteCount
                continue
            }
            try scratch.withUnsafeMutableBytes { try readBlock(id, into: $0) }
            scratch.withUnsafeBytes { raw in
                UnsafeMutableRawBufferPointer(rebasing: destination[done..<done + take])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[inBlock..<inBlock + take]))
            }
            done += take
        }
    }

    // MARK: - Writing

    /// Writes `data` at `byteOffset` of a writable volume, one atomic unit of at most
    /// 1 MiB at a time (each unit is one journal record).
    func write(_ volume: VolumeState, byteOffset: UInt64, data: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < data.count {
            let take = min(Self.atomicUnitByteCount, data.count - done)
            try writeUnit(volume, byteOffset: byteOffset + UInt64(done),
                          data: UnsafeRawBufferPointer(rebasing: data[done..<done + take]))
            done += take
        }
    }

    private func writeUnit(_ volume: VolumeState, byteOffset: UInt64, data: UnsafeRawBufferPointer) throws {
        let bs = UInt64(blockByteCount)
        let first = byteOffset / bs
        let last = (byteOffset + UInt64(data.count) - 1) / bs
        // Build each block's new content: whole blocks straight from `data`, partial ones
        // merged over their current content (read-modify-write).
        var contents: [[UInt8]] = []
        contents.reserveCapacity(Int(last - first + 1))
        for blockIndex in first...last {
            let blockStart = blockIndex * bs
            let lower = max(blockStart, byteOffset), upper = min(blockStart + bs, byteOffset + UInt64(data.count))
            let source = UnsafeRawBufferPointer(rebasing: data[Int(lower - byteOffset)..<Int(upper - byteOffset)])
            if lower == blockStart && upper == blockStart + bs {
                contents.append(Array(source))
            } else {
                var block = [UInt8](repeating: 0, count: blockByteCount)
                let old = mapLookup(volume.map, blockIndex: blockIndex)
                if old != 0 { try block.withUnsafeMutableBytes { try readBlock(old, into: $0) } }
                block.withUnsafeMutableBytes { raw in
                    UnsafeMutableRawBufferPointer(rebasing: raw[Int(lower - blockStart)..<Int(upper - blockStart)]).copyMemory(from: source)
                }
                contents.append(block)
            }
        }
        try writeBlocks(volume, indexes: Array(first...last), contents: contents, unmapRanges: [])
    }

    /// Stores `contents[i]` as a new block at logical block `indexes[i]` and journals one
    /// record that also unmaps `unmapRanges`. Admission happens before any change.
    func writeBlocks(_ volume: VolumeState, indexes: [UInt64], contents: [[UInt8]], unmapRanges: [Range<UInt64>]) throws {
        let encoded = encodeAll(contents)
        let dataBytes = encoded.reduce(UInt64(0)) { $0 + UInt64($1.allocatedByteCount) }
        let leafCount = contents.count / PageLayout.mapLeafFanout + 2 + unmapRanges.count * 2
        let payload = JournalIntent.map(volumeID: 0, unmapRanges: unmapRanges, mappings: []).payloadByteCount + contents.count * 40
        try ensureSpace(dataByteCount: dataBytes,
                        pageCount: pageBound(mapHeight: volume.map.height, leafCount: leafCount, newBlockCount: contents.count))
        try ensureJournalSpace(payloadByteCount: payload)
        // Nothing has changed yet; from here on only an I/O error can fail, and it poisons.
        var batch = WriteBatch()
        var mappings: [BlockMapping] = []
        mappings.reserveCapacity(encoded.count)
        for (i, block) in encoded.enumerated() {
            let offset = allocateExtent(byteCount: block.allocatedByteCount, batch: &batch)
            var padded = block.stored
            if padded.count < block.allocatedByteCount { padded.append(contentsOf: repeatElement(0, count: block.allocatedByteCount - padded.count)) }
            batch.add(padded, at: offset)
            let location = BlockLocation(byteOffset: offset, storedByteCount: UInt32(block.stored.count),
                                         flags: block.flags, checksum: block.checksum)
            mappings.append(BlockMapping(blockIndex: indexes[i], blockID: allocateBlockID(), location: location))
        }
        try deviceCall { try batch.write(to: device) }
        try journalAndApply(.map(volumeID: volume.record.id, unmapRanges: unmapRanges, mappings: mappings))
    }
}
