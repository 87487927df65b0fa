import LogPoolFormat

/// Applying journal intents to the in-memory state. The live path builds an intent, journals
/// it and applies it with this same code; replay applies what it reads. So a replayed pool
/// is the live pool by construction (Specs/COMMIT.md §4).
extension Engine {
    /// Applies `intent`. Every reference in it is checked first and a bad one throws
    /// ``PoolError/corrupt(structure:byteOffset:detail:)`` naming `recordByteOffset`,
    /// before anything changes: a record that passed its checksum but does not fit the
    /// state is damage (or a bug), never a trap.
    func apply(_ intent: JournalIntent, recordByteOffset: UInt64 = 0) throws {
        func bad(_ detail: String) -> PoolError {
            .corrupt(structure: "journal record", byteOffset: recordByteOffset, detail: detail)
        }
        /// `body`, with the catalog's refusal as the record's damage.
        @discardableResult
        func catalogChange<T>(_ body: () throws -> T) throws -> T {
            do { return try body() } catch let refusal as VolumeCatalog.Refusal { throw bad(refusal.description) }
        }
        func checkName(_ name: String) throws {
            do { try Pool.validate(name: name, strict: false) } catch { throw bad("volume name is invalid: \(error)") }
            let limit = Int(geometry.segmentPayloadByteCount) - PoolGeometry.pageByteCount
            guard plannedRootUnpaddedByteCount + CheckpointRoot.volumeRowByteCount(name: name) <= limit else {
                throw bad("the volume table would outgrow one segment")
            }
        }
        switch intent {
        case .createVolume(_, let name, _, _), .branch(_, _, _, let name, _), .rename(_, let name):
            try checkName(name)
        default:
            break
        }
        switch intent {
        case .padding, .wrap:
            return
        case .createVolume(let id, let name, let size, let time):
            try catalogChange { try catalog.checkNew(id: id, name: name) }
            guard size % UInt64(blockByteCount) == 0, size <= Pool.volumeSizeMax else { throw bad("volume size \(size) is invalid") }
            let height = PageLayout.height(kind: .map, coveringSlotCount: blockCount(sizeByteCount: size))
            let record = VolumeRecord(id: id, kind: .volume, name: name, sizeByteCount: size, createdTime: time,
                                      originID: 0, mapRoot: .none, mapHeight: height)
            let volume = VolumeState(record: record, map: Tree(kind: .map, root: nil, height: height))
            try catalogChange { try catalog.add(volume) }
        case .branch(let id, let sourceID, let kind, let name, let time):
            try catalogChange { try catalog.checkNew(id: id, name: name) }
            guard let source = catalog[sourceID] else { throw bad("source volume id \(sourceID) does not exist") }
            let record = VolumeRecord(id: id, kind: kind, name: name, sizeByteCount: source.record.sizeByteCount,
                                      createdTime: time, originID: sourceID, mapRoot: .none, mapHeight: source.map.height)
            try catalogChange { try catalog.add(VolumeState(record: record, map: source.map)) }
            source.map.root?.parentCount += 1
        case .delete(let id):
            // O(1) in pages: the map joins the release queue, whose steps release its
            // blocks later (``reclaimStep()``); until then they stay referenced.
            try catalogChange { try catalog.remove(id: id) }
        case .releaseQueued(let id, let upTo):
            let queued = try catalogChange { try catalog.queued(id: id) }
            guard upTo > queued.releasedSlotCount, upTo <= queued.map.capacity else {
                throw bad("release bound \(upTo) of queued map \(id) is not above \(queued.releasedSlotCount) and within its \(queued.map.capacity) slots")
            }
            if upTo == queued.map.capacity {
                // The last step drops the map itself (what is left of it: a shared root
                // loses one parent; an own one holds only what earlier steps emptied).
                if let root = queued.map.root { try release(root, kind: .map) }
                try catalogChange { try catalog.dequeue(id: id) }
            } else {
                try mapUnmap(&queued.map, range: queued.releasedSlotCount..<upTo)
                queued.releasedSlotCount = upTo
            }
        case .rename(let id, let name):
            try catalogChange { try catalog.rename(id: id, to: name) }
        case .resize(let id, let size):
            guard let volume = volumes[id] else { throw bad("volume id \(id) does not exist") }
            guard size % UInt64(blockByteCount) == 0, size <= Pool.volumeSizeMax else { throw bad("volume size \(size) is invalid") }
            let oldCount = blockCount(sizeByteCount: volume.record.sizeByteCount)
            let newCount = blockCount(sizeByteCount: size)
            if newCount < oldCount {
                try mapUnmap(&volume.map, range: newCount..<oldCount)
            } else {
                grow(&volume.map, toCover: newCount)
            }
            volume.record.sizeByteCount = size
        case .map(let volumeID, let ranges, let mappings):
            guard let volume = volumes[volumeID] else { throw bad("volume id \(volumeID) does not exist") }
            let count = blockCount(sizeByteCount: volume.record.sizeByteCount)
            for range in ranges where range.upperBound > count {
                throw bad("unmap range \(range) beyond volume \(volumeID)'s \(count) blocks")
            }
            // New ids stay below what the writer's id space can have reached: replay
            // mirrors ``reserveBlockIDs`` (the live count here is the writer's before the
            // same write, and one write reserves at most one unit's ids), so a recovered
            // limit also stays within FORMAT C-6 and the pool reopens.
            ids.raiseHighWater(forAllocating: Engine.idsPerWriteMax(blockByteCount: blockByteCount))
            // Ids in increasing order (what the live path writes) are distinct without a set.
            var newIDs = Set<UInt64>()
            var increasing = true
            for (i, m) in mappings.enumerated() {
                guard m.blockIndex < count else { throw bad("block index \(m.blockIndex) beyond volume \(volumeID)'s \(count) blocks") }
                if increasing && i > 0 && m.blockID <= mappings[i - 1].blockID {
                    increasing = false
                    newIDs = Set(mappings[..<i].lazy.map(\.blockID))
                }
                if increasing {
                    try checkNewBlock(m.blockID, m.location, newIDs: nil, bad)
                } else {
                    try checkNewBlock(m.blockID, m.location, newIDs: &newIDs, bad)
                }
            }
            for range in ranges { try mapUnmap(&volume.map, range: range) }
            // One descent per leaf, not per block: within this loop nothing shares or
            // cleans these trees, so a leaf made unique and dirty stays so.
            var mapLeaf = LeafCursor(), tableLeaf = LeafCursor()
            for m in mappings {
                try createBlock(m.blockID, m.location, cursor: &tableLeaf)
                let (leaf, index) = try mapLeaf.leaf(for: m.blockIndex, fanout: PageLayout.mapLeafFanout) {
                    try leafForWriting(&volume.map, slot: m.blockIndex)
                }
                let old = leaf.words[index]
                leaf.words[index] = m.blockID
                try ids.retain(m.blockID, load: storedRefcountWords)
                if old != 0 { try dropBlockReference(old) }
            }
        case .mapRun(let volumeID, let index, let id, let offset, let stored, let checksums):
            // Same checks and effect as the `map` it stands for; the run's arithmetic is
            // checked for overflow first so a damaged record cannot wrap around.
            let count = UInt64(checksums.count)
            guard index.addingReportingOverflow(count).overflow == false, id.addingReportingOverflow(count).overflow == false,
                  offset.addingReportingOverflow(count.multipliedReportingOverflow(by: UInt64(stored)).partialValue).overflow == false,
                  count.multipliedReportingOverflow(by: UInt64(stored)).overflow == false
            else { throw bad("block run overflows") }
            let mappings = JournalIntent.runMappings(firstBlockIndex: index, firstBlockID: id, firstByteOffset: offset,
                                                     storedByteCount: stored, checksums: checksums)
            try apply(.map(volumeID: volumeID, unmapRanges: [], mappings: mappings), recordByteOffset: recordByteOffset)
        case .relocate(let moves):
            for move in moves {
                guard try refcount(move.blockID) > 0 else {
                    throw bad("relocated block id \(move.blockID) is not in use")
                }
                try checkLocation(move.location, bad)
            }
            for move in moves {
                try removeLiveData(of: move.blockID, at: try blockLocation(move.blockID))
                try setBlockLocation(move.blockID, move.location)
                space.addData(move.location.allocatedByteCount, at: move.location.byteOffset)
                markWritten(move.location)
            }
        }
    }

    private func checkLocation(_ location: BlockLocation, _ bad: (String) -> PoolError) throws {
        guard location.storedByteCount > 0, location.storedByteCount <= UInt32(blockByteCount),
              location.flags & ~BlockLocation.flagCompressed == 0,
              geometry.isValidExtent(byteOffset: location.byteOffset, byteCount: location.allocatedByteCount)
        else { throw bad("block location \(location.byteOffset)+\(location.storedByteCount) is invalid") }
    }

    /// `newIDs` nil: the caller knows the ids are distinct (strictly increasing).
    private func checkNewBlock(_ id: UInt64, _ location: BlockLocation, newIDs: UnsafeMutablePointer<Set<UInt64>>?,
                               _ bad: (String) -> PoolError) throws {
        // The id must be one the writer could have reserved (``BlockIDs/highWater``): the
        // bound keeps a damaged or crafted record from making the id-indexed arrays huge.
        guard id >= 1, id < ids.highWater else {
            throw bad("new block id \(id) is out of range (the id space reaches \(ids.highWater) here)")
        }
        guard try refcount(id) == 0, newIDs?.pointee.insert(id).inserted ?? true else {
            throw bad("new block id \(id) is already in use")
        }
        try checkLocation(location, bad)
    }

    /// Enters a new block in the table (refcount still 0; the caller maps it).
    private func createBlock(_ id: UInt64, _ location: BlockLocation, cursor: inout LeafCursor) throws {
        ids.extend(to: id + 1)
        grow(&blockTable, toCover: id + 1)
        let (leaf, index) = try cursor.leaf(for: id, fanout: PageLayout.blockTableLeafFanout) {
            try leafForWriting(&blockTable, slot: id)
        }
        storeBlockLocation(id, location, leaf: leaf, index: index)
        space.addData(location.allocatedByteCount, at: location.byteOffset)
        markWritten(location)
    }

    /// During replay, a segment a record wrote into is not free (reuse rule R-1).
    private func markWritten(_ location: BlockLocation) {
        space.markWritten(location.byteOffset)
    }
}

/// The last leaf one `apply` descended to for writing, so runs of slots in one leaf cost
/// one descent. Only valid while nothing shares, cleans or replaces nodes of that tree.
struct LeafCursor {
    private var firstSlot: UInt64 = 0
    private var node: TreeNode? = nil

    mutating func leaf(for slot: UInt64, fanout: Int, descend: () throws -> (leaf: TreeNode, index: Int)) rethrows -> (leaf: TreeNode, index: Int) {
        if let node, slot >= firstSlot, slot - firstSlot < UInt64(fanout) { return (node, Int(slot - firstSlot)) }
        let found = try descend()
        node = found.leaf
        firstSlot = slot - UInt64(found.index)
        return found
    }
}
