import LogPoolFormat

/// The block-id space (Specs/ARCHITECTURE.md §2): how many map leaves name each id
/// (refcounts, derived from the maps: Specs/FORMAT.md §5.3), how many ids are live, and
/// the allocation sweep. Where a block lies is the block table's alone (its leaves, read
/// through the engine): there is no second, flat copy of the locations.
///
/// A value type changed only through its methods, which keep `liveCount` equal to the
/// number of nonzero refcounts and the refcount array exactly `limit` long. The engine calls
/// them from the tree operations and `apply`; ``BlockIDsTests`` checks them alone.
struct BlockIDs {
    /// Ids `0..<limit` exist (0 is never a block: it means "unmapped").
    private(set) var limit: UInt64 = 1
    private(set) var refcounts: [UInt32] = [0]
    /// Ids with a nonzero refcount.
    private(set) var liveCount = 0
    /// Where the next id search starts (see ``allocate()``).
    private(set) var cursor: UInt64 = 1
    /// The highest limit the writer can have reached so far (``idSpaceLimit(forAllocating:)``
    /// evaluated before every map record, as the writer reserves before every write): a
    /// replayed record naming a new id at or above it is damage, so a crafted record
    /// cannot make the id-indexed arrays grow beyond what the records replayed justify.
    private(set) var highWater: UInt64 = 0

    init() {}

    /// An id space of `limit` ids, none referenced yet (open, before counting the maps).
    init(limit: UInt64) {
        self.limit = max(1, limit)
        refcounts = [UInt32](repeating: 0, count: Int(self.limit))
    }

    @inline(__always)
    func refcount(_ id: UInt64) -> UInt32 { id < limit ? refcounts[Int(id)] : 0 }

    /// True when some id in `range` is referenced (a block-table leaf's ids: when none
    /// is, the leaf's bytes do not matter, FORMAT §5.3).
    func anyReferenced(in range: Range<UInt64>) -> Bool {
        let upper = min(range.upperBound, limit)
        guard range.lowerBound < upper else { return false }
        return refcounts[Int(range.lowerBound)..<Int(upper)].contains { $0 != 0 }
    }

    /// One more map leaf names `id` (which is below the limit).
    @inline(__always)
    mutating func retain(_ id: UInt64) {
        let index = Int(id)
        if refcounts[index] == 0 { liveCount += 1 }
        refcounts[index] += 1
    }

    /// One fewer map leaf names `id`. Returns true when that was the last reference (the
    /// block is free and its space dead).
    @inline(__always)
    mutating func release(_ id: UInt64) -> Bool {
        let index = Int(id)
        precondition(refcounts[index] > 0, "block \(id) released more often than referenced")
        refcounts[index] -= 1
        guard refcounts[index] == 0 else { return false }
        liveCount -= 1
        return true
    }

    /// Grows the space so ids below `newLimit` exist (never shrinks).
    mutating func extend(to newLimit: UInt64) {
        guard newLimit > limit else { return }
        let added = Int(newLimit - limit)
        refcounts.append(contentsOf: repeatElement(0, count: added))
        limit = newLimit
    }

    /// Ids kept beyond the live ones: at least a quarter of the live count plus 64, and
    /// always room for a whole batch of `count`.
    func idSpaceLimit(forAllocating count: Int) -> UInt64 {
        let live = UInt64(max(0, liveCount + count))
        return max(limit, live + live / 4 + 64 + UInt64(count))
    }

    /// Grows the space so `count` allocations find free ids (call before a batch).
    mutating func reserve(forAllocating count: Int) {
        extend(to: idSpaceLimit(forAllocating: count))
    }

    /// Raises ``highWater`` to what a writer reserving for `count` ids could reach now.
    mutating func raiseHighWater(forAllocating count: Int) {
        highWater = max(highWater, limit, idSpaceLimit(forAllocating: count))
    }

    /// The next free id at or after the cursor, wrapping once. Ids are handed out in
    /// sweep order, so blocks written together get nearby ids and share block-table
    /// pages; that keeps compaction from rewriting the whole table (it moves a segment's
    /// blocks, which were written together). The caller reserved the batch with
    /// ``reserve(forAllocating:)``, so a free id exists and the sweep never laps itself.
    mutating func allocate() -> UInt64 {
        var id = cursor
        var steps: UInt64 = 0
        while true {
            if id >= limit { id = 1 }
            if refcounts[Int(id)] == 0 { break }
            id += 1
            steps += 1
            precondition(steps <= limit, "no free block id: reserve(forAllocating:) was not called")
        }
        cursor = id + 1
        return id
    }

    /// The ids the next `count` calls of ``allocate()`` will return after
    /// ``reserve(forAllocating:)`` (computed without changing anything).
    func peek(_ count: Int) -> [UInt64] {
        let reserved = idSpaceLimit(forAllocating: count)
        var result: [UInt64] = []
        result.reserveCapacity(count)
        var id = cursor
        var steps: UInt64 = 0
        while result.count < count && steps <= reserved {
            if id >= reserved { id = 1 }
            if id >= limit || refcounts[Int(id)] == 0 { result.append(id) }
            id += 1
            steps += 1
        }
        return result
    }
}
