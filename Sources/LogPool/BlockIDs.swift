import LogPoolFormat

/// The block-id space (Specs/ARCHITECTURE.md §2): how many map leaves name each id
/// (refcounts: stored in the refcount tree, FORMAT §5.4, and loaded at open, or rebuilt
/// from the maps), how many ids are live, which refcount leaves changed since the last
/// checkpoint wrote them, and the allocation sweep. Where a block lies is the block table's alone (its leaves, read
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
    /// Per refcount leaf (``PageLayout/refcountsPerLeaf`` ids): a count in it changed
    /// since the last checkpoint wrote it, so the next one writes it again.
    private(set) var changedLeaves: [Bool] = [false]
    private(set) var changedLeafCount = 0

    init() {}

    /// An id space of `limit` ids, none referenced yet (open, before the counts load).
    init(limit: UInt64) {
        self.limit = max(1, limit)
        refcounts = [UInt32](repeating: 0, count: Int(self.limit))
        changedLeaves = [Bool](repeating: false, count: Self.leafCount(self.limit))
    }

    /// Refcount leaves covering `limit` ids.
    static func leafCount(_ limit: UInt64) -> Int {
        Int((limit + UInt64(PageLayout.refcountsPerLeaf) - 1) / UInt64(PageLayout.refcountsPerLeaf))
    }

    /// The largest count a stored leaf may hold (FORMAT C-9): far above any real count (a
    /// count is at most the number of map leaves, each a 4 KiB page), and low enough that
    /// no retain can overflow 32 bits.
    static let storedCountMax: UInt32 = 1 << 31

    @inline(__always)
    private mutating func markChanged(_ index: Int) {
        markChanged(leaf: index / PageLayout.refcountsPerLeaf)
    }

    /// Leaf `leaf` is written by the next checkpoint (its stored counts were wrong).
    mutating func markChanged(leaf: Int) {
        if !changedLeaves[leaf] {
            changedLeaves[leaf] = true
            changedLeafCount += 1
        }
    }

    /// Every leaf is written by the next checkpoint (counts rebuilt from the maps).
    mutating func markAllChanged() {
        for leaf in changedLeaves.indices { changedLeaves[leaf] = true }
        changedLeafCount = changedLeaves.count
    }

    /// The changed leaves, in order, now marked unchanged (the checkpoint writes them).
    mutating func takeChangedLeaves() -> [Int] {
        guard changedLeafCount > 0 else { return [] }
        let result = changedLeaves.indices.filter { changedLeaves[$0] }
        for leaf in result { changedLeaves[leaf] = false }
        changedLeafCount = 0
        return result
    }

    /// Refcount leaf `leaf` as page words: ids 2k and 2k+1 of the leaf in word k, the
    /// even one in the low half; ids at or beyond the limit count zero.
    func packedWords(leaf: Int) -> [UInt64] {
        let first = leaf * PageLayout.refcountsPerLeaf
        var words = [UInt64](repeating: 0, count: PageLayout.wordCapacity)
        let end = min(first + PageLayout.refcountsPerLeaf, refcounts.count)
        var index = first
        while index < end {
            let low = UInt64(refcounts[index])
            let high = index + 1 < end ? UInt64(refcounts[index + 1]) : 0
            words[(index - first) / 2] = low | high << 32
            index += 2
        }
        return words
    }

    /// What is wrong with the stored counts of refcount leaf `leaf` in an id space of
    /// `limit` ids (FORMAT C-9: a count for id 0 or for an id at or beyond the limit, or
    /// a count above ``storedCountMax``), or nil. Any leaf index is accepted (a crafted
    /// tree can place a leaf anywhere its height reaches) without overflowing.
    static func storedLeafProblem(leaf: UInt64, words: [UInt64], limit: UInt64) -> String? {
        let perLeaf = UInt64(PageLayout.refcountsPerLeaf)
        let (first, overflow) = leaf.multipliedReportingOverflow(by: perLeaf)
        for (k, word) in words.enumerated() where word != 0 {
            for half in 0..<2 {
                let count = UInt32(truncatingIfNeeded: word >> (32 * half))
                guard count != 0 else { continue }
                let offset = UInt64(2 * k + half)
                guard !overflow, first < limit, offset < limit - first, first + offset != 0 else {
                    let id = overflow ? "beyond 2^64" : "\(first.addingReportingOverflow(offset).partialValue)"
                    return "block id \(id) (refcount leaf \(leaf), word \(k)) has count \(count), but ids run from 1 below the limit \(limit)"
                }
                guard count <= storedCountMax else {
                    return "block id \(first + offset) has count \(count), above \(storedCountMax)"
                }
            }
        }
        return nil
    }

    /// Loads the stored counts of refcount leaf `leaf` (open). Returns what is wrong
    /// with them (``storedLeafProblem(leaf:words:limit:)``), or nil; counts load only
    /// when nothing is.
    mutating func load(leaf: UInt64, words: [UInt64]) -> String? {
        if let problem = Self.storedLeafProblem(leaf: leaf, words: words, limit: limit) { return problem }
        // Every nonzero count is now below the limit, so the index arithmetic fits.
        for (k, word) in words.enumerated() where word != 0 {
            for half in 0..<2 {
                let count = UInt32(truncatingIfNeeded: word >> (32 * half))
                guard count != 0 else { continue }
                let id = Int(leaf) * PageLayout.refcountsPerLeaf + 2 * k + half
                if refcounts[id] == 0 { liveCount += 1 }
                refcounts[id] = count
            }
        }
        return nil
    }

    /// The stored counts of leaf `leaf` differ from these (verify and repair compare).
    func differs(leaf: Int, from words: [UInt64]) -> Bool {
        packedWords(leaf: leaf) != words
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
        markChanged(index)
    }

    /// One fewer map leaf names `id`. Returns true when that was the last reference (the
    /// block is free and its space dead), nil when its count is already zero (stored
    /// counts that a map contradicts: the caller reports corruption, nothing changes).
    @inline(__always)
    mutating func release(_ id: UInt64) -> Bool? {
        guard id < limit, refcounts[Int(id)] > 0 else { return nil }
        let index = Int(id)
        refcounts[index] -= 1
        markChanged(index)
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
        let leaves = Self.leafCount(newLimit)
        if leaves > changedLeaves.count { changedLeaves.append(contentsOf: repeatElement(false, count: leaves - changedLeaves.count)) }
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
