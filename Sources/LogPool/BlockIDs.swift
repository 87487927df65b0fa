import LogPoolFormat

/// The block-id space (Specs/ARCHITECTURE.md §2): how many map leaves name each id
/// (refcounts: stored in the refcount tree, FORMAT §5.4, and read on use, or rebuilt from
/// the maps), how many ids are live, which refcount leaves changed since the last
/// checkpoint wrote them, and the allocation sweep. Where a block lies is the block
/// table's alone (its leaves, read through the engine): there is no flat copy of it.
///
/// The counts are paged (ARCHITECTURE §5 step 3): a refcount leaf's 1,018 counts are
/// resident only while used. Every method that reads or changes a count takes a
/// `load` function that returns the stored words of a leaf (the engine reads them from
/// the refcount tree); a resident leaf is used as it is. A leaf whose counts changed is
/// pinned until a checkpoint takes it (``takeChangedLeaves()``); a leaf *pinned* by
/// ``pin(_:load:)`` stays until ``unpinAll()``, so an operation can read every leaf
/// its `apply` will change before its record is journaled (a leaf that cannot be read
/// then fails the operation with nothing changed). Other (clean, unpinned) leaves are
/// dropped in CLOCK order when more than ``budgetLeafCount`` of them are resident.
///
/// A class, changed only by the writer (under the writers' mutex, and under the
/// exclusive lock for anything readers plan from: ``limit``); readers never touch
/// counts. Its methods keep ``liveCount`` equal to the number of nonzero counts;
/// ``BlockIDsTests`` checks them alone.
final class BlockIDs {
    /// The stored words of refcount leaf `leaf` (`PageLayout.wordCapacity` of them, or
    /// none for a leaf that holds only zeros).
    typealias Loader = (Int) throws -> [UInt64]

    static let perLeaf = PageLayout.refcountsPerLeaf

    /// One resident refcount leaf.
    final class Leaf {
        var counts: [UInt32]
        /// Ids of this leaf with a nonzero count.
        var nonzero = 0
        var changed = false
        var pinned = false
        var referenced = true

        init(words: [UInt64]) {
            counts = [UInt32](repeating: 0, count: BlockIDs.perLeaf)
            for (k, word) in words.prefix(PageLayout.wordCapacity).enumerated() where word != 0 {
                let low = UInt32(truncatingIfNeeded: word), high = UInt32(truncatingIfNeeded: word >> 32)
                if low != 0 { counts[2 * k] = low; nonzero += 1 }
                if high != 0 { counts[2 * k + 1] = high; nonzero += 1 }
            }
        }
    }

    /// Ids `0..<limit` exist (0 is never a block: it means "unmapped").
    private(set) var limit: UInt64
    /// Ids with a nonzero refcount (stored in the checkpoint root, FORMAT C-10).
    private(set) var liveCount: Int
    /// Where the next id search starts (see ``allocate(load:)``).
    private(set) var cursor: UInt64 = 1
    /// The highest limit the writer can have reached so far (``idSpaceLimit(forAllocating:)``
    /// evaluated before every map record, as the writer reserves before every write): a
    /// replayed record naming a new id at or above it is damage, so a crafted record
    /// cannot make the id space grow beyond what the records replayed justify.
    private(set) var highWater: UInt64 = 0
    /// Clean, unpinned leaves kept resident at most (at least one).
    let budgetLeafCount: Int
    /// Per refcount leaf: its counts when resident.
    private var leaves: [Leaf?]
    /// Resident leaf indexes, in CLOCK order.
    private var ring: [Int] = []
    private var hand = 0
    private var pinnedLeaves: [Int] = []
    private(set) var changedLeafCount = 0
    /// Resident leaves that are changed or pinned (never dropped): eviction compares the
    /// others with the budget, so a ring full of changed leaves is not swept on every
    /// read and every ``unpinAll()`` (it was, at 16 GiB of random overwrites).
    private var heldCount = 0
    /// Leaves read through `load` since creation, and of those, leaves read again after
    /// being dropped (for tests, `bench` and the crash simulation's coverage).
    private(set) var loadCount = 0
    private(set) var rereadCount = 0
    /// Per leaf: dropped at least once (one byte per 1,018 ids).
    private var evictedBefore: [Bool]

    /// An id space of `limit` ids of which `liveCount` are referenced (open: the counts
    /// themselves are read on use), or none referenced.
    init(limit: UInt64 = 1, liveCount: Int = 0, budgetLeafCount: Int = .max) {
        self.limit = max(1, limit)
        self.liveCount = liveCount
        self.budgetLeafCount = max(1, budgetLeafCount)
        leaves = [Leaf?](repeating: nil, count: Self.leafCount(self.limit))
        evictedBefore = [Bool](repeating: false, count: leaves.count)
    }

    /// Refcount leaves covering `limit` ids.
    static func leafCount(_ limit: UInt64) -> Int {
        Int((limit + UInt64(perLeaf) - 1) / UInt64(perLeaf))
    }

    /// The largest count a stored leaf may hold (FORMAT C-9): far above any real count (a
    /// count is at most the number of map leaves, each a 4 KiB page), and low enough that
    /// no retain can overflow 32 bits.
    static let storedCountMax: UInt32 = 1 << 31

    /// Resident leaves (dirty and pinned ones included).
    var residentLeafCount: Int { ring.count }

    /// The held count equals the resident leaves that are changed or pinned (tests).
    var heldCountIsExact: Bool {
        heldCount == ring.reduce(0) { $0 + (leaves[$1].map { $0.changed || $0.pinned ? 1 : 0 } ?? 0) }
    }

    // MARK: - Residency

    /// Leaf `leaf`, read through `load` when not resident. Reading one drops clean,
    /// unpinned leaves past the budget first (never the one just read).
    @inline(__always)
    private func resident(_ leaf: Int, load: Loader) throws -> Leaf {
        if let found = leaves[leaf] {
            found.referenced = true
            return found
        }
        return try read(leaf, load: load)
    }

    private func read(_ leaf: Int, load: Loader) throws -> Leaf {
        let words = try load(leaf)
        evict(keeping: budgetLeafCount - 1)
        let node = Leaf(words: words)
        leaves[leaf] = node
        ring.append(leaf)
        loadCount += 1
        if evictedBefore[leaf] { rereadCount += 1 }
        return node
    }

    /// Reads the leaf holding `id` if needed and keeps it resident until ``unpinAll()``.
    func pin(_ id: UInt64, load: Loader) throws {
        guard id < limit else { return }
        let leaf = Int(id / UInt64(Self.perLeaf))
        hold(try resident(leaf, load: load), leaf)
    }

    private func hold(_ node: Leaf, _ leaf: Int) {
        guard !node.pinned else { return }
        if !node.changed { heldCount += 1 }
        node.pinned = true
        pinnedLeaves.append(leaf)
    }

    /// Ends an operation: its pinned leaves may be dropped again, down to the budget.
    func unpinAll() {
        for leaf in pinnedLeaves {
            guard let node = leaves[leaf], node.pinned else { continue }
            node.pinned = false
            if !node.changed { heldCount -= 1 }
        }
        pinnedLeaves.removeAll(keepingCapacity: true)
        evict(keeping: budgetLeafCount)
    }

    /// Drops clean, unpinned, unreferenced leaves until no more than `keep` are
    /// resident (one sweep of twice the ring: ends when every leaf is pinned).
    private func evict(keeping keep: Int) {
        var steps = 2 * ring.count
        while ring.count - heldCount > keep && steps > 0 {
            steps -= 1
            if hand >= ring.count { hand = 0 }
            let leaf = ring[hand]
            guard let node = leaves[leaf] else {
                ring.swapAt(hand, ring.count - 1)
                ring.removeLast()
                continue
            }
            if node.changed || node.pinned { hand += 1; continue }
            if node.referenced { node.referenced = false; hand += 1; continue }
            leaves[leaf] = nil
            evictedBefore[leaf] = true
            ring.swapAt(hand, ring.count - 1)
            ring.removeLast()
        }
    }

    // MARK: - Changed leaves (what the next checkpoint writes)

    private func markChanged(_ node: Leaf) {
        if !node.changed {
            if !node.pinned { heldCount += 1 }
            node.changed = true
            changedLeafCount += 1
        }
    }

    /// Leaf `leaf` is written by the next checkpoint (its stored counts were wrong, or it
    /// was moved): read now, pinned until then.
    func markChanged(leaf: Int, load: Loader) throws {
        markChanged(try resident(leaf, load: load))
    }

    /// Leaf `leaf` need not be written after all (derived counts equal to the stored ones).
    func clearChanged(leaf: Int) {
        guard leaf < leaves.count, let node = leaves[leaf], node.changed else { return }
        node.changed = false
        changedLeafCount -= 1
        if !node.pinned { heldCount -= 1 }
    }

    /// Whether leaf `leaf`'s counts changed since the last checkpoint took them.
    func isChanged(leaf: Int) -> Bool { leaf < leaves.count && leaves[leaf]?.changed == true }

    /// The changed leaves, in order, now marked unchanged (the checkpoint writes them;
    /// they stay resident until dropped like any clean leaf).
    func takeChangedLeaves() -> [Int] {
        guard changedLeafCount > 0 else { return [] }
        var result: [Int] = []
        result.reserveCapacity(changedLeafCount)
        for leaf in ring {
            guard let node = leaves[leaf], node.changed else { continue }
            node.changed = false
            if !node.pinned { heldCount -= 1 }
            result.append(leaf)
        }
        changedLeafCount = 0
        result.sort()
        return result
    }

    /// Refcount leaf `leaf` as page words: ids 2k and 2k+1 of the leaf in word k, the
    /// even one in the low half; ids at or beyond the limit count zero.
    func packedWords(leaf: Int, load: Loader) throws -> [UInt64] {
        let counts = try resident(leaf, load: load).counts
        var words = [UInt64](repeating: 0, count: PageLayout.wordCapacity)
        for k in 0..<PageLayout.wordCapacity {
            words[k] = UInt64(counts[2 * k]) | UInt64(counts[2 * k + 1]) << 32
        }
        return words
    }

    /// What is wrong with the stored counts of refcount leaf `leaf` in an id space of
    /// `limit` ids (FORMAT C-9: a count for id 0 or for an id at or beyond the limit, or
    /// a count above ``storedCountMax``), or nil. Any leaf index is accepted (a crafted
    /// tree can place a leaf anywhere its height reaches) without overflowing.
    static func storedLeafProblem(leaf: UInt64, words: [UInt64], limit: UInt64) -> String? {
        let perLeaf = UInt64(Self.perLeaf)
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

    /// The counts of leaf `leaf` differ from stored `words` (open and repair compare
    /// derived counts with the stored ones).
    func differs(leaf: Int, from words: [UInt64], load: Loader) throws -> Bool {
        try packedWords(leaf: leaf, load: load) != words
    }

    // MARK: - Counts

    func refcount(_ id: UInt64, load: Loader) throws -> UInt32 {
        guard id < limit else { return 0 }
        let perLeaf = UInt64(Self.perLeaf)
        return try resident(Int(id / perLeaf), load: load).counts[Int(id % perLeaf)]
    }

    /// True when some id in `range` is referenced (a block-table leaf's ids: when none
    /// is, the leaf's bytes do not matter, FORMAT §5.3).
    func anyReferenced(in range: Range<UInt64>, load: Loader) throws -> Bool {
        let upper = min(range.upperBound, limit)
        guard range.lowerBound < upper else { return false }
        let perLeaf = UInt64(Self.perLeaf)
        var id = range.lowerBound
        while id < upper {
            let leaf = id / perLeaf, first = leaf * perLeaf
            let end = min(upper, first + perLeaf)
            let node = try resident(Int(leaf), load: load)
            if node.nonzero > 0 && node.counts[Int(id - first)..<Int(end - first)].contains(where: { $0 != 0 }) { return true }
            id = end
        }
        return false
    }

    /// One more map leaf names `id` (which is below the limit).
    @inline(__always)
    func retain(_ id: UInt64, load: Loader) throws {
        let perLeaf = UInt64(Self.perLeaf)
        let node = try resident(Int(id / perLeaf), load: load)
        let index = Int(id % perLeaf)
        if node.counts[index] == 0 {
            liveCount += 1
            node.nonzero += 1
        }
        node.counts[index] += 1
        markChanged(node)
    }

    /// One fewer map leaf names `id`. Returns true when that was the last reference (the
    /// block is free and its space dead), nil when its count is already zero (stored
    /// counts that a map contradicts: the caller reports corruption, nothing changes).
    @inline(__always)
    func release(_ id: UInt64, load: Loader) throws -> Bool? {
        guard id < limit else { return nil }
        let perLeaf = UInt64(Self.perLeaf)
        let node = try resident(Int(id / perLeaf), load: load)
        let index = Int(id % perLeaf)
        guard node.counts[index] > 0 else { return nil }
        node.counts[index] -= 1
        markChanged(node)
        guard node.counts[index] == 0 else { return false }
        node.nonzero -= 1
        liveCount -= 1
        return true
    }

    // MARK: - The id space and allocation

    /// Takes `other`'s sweep position and high-water mark (counts rebuilt from the maps).
    func continueSweep(from other: BlockIDs) {
        cursor = other.cursor
        highWater = other.highWater
    }

    /// Grows the space so ids below `newLimit` exist (never shrinks). The new ids count
    /// zero; leaves that were past the old limit are read on use like any other (their
    /// stored ids beyond the old limit are zero, C-9).
    func extend(to newLimit: UInt64) {
        guard newLimit > limit else { return }
        limit = newLimit
        let count = Self.leafCount(newLimit)
        if count > leaves.count {
            evictedBefore.append(contentsOf: repeatElement(false, count: count - leaves.count))
            leaves.append(contentsOf: repeatElement(nil, count: count - leaves.count))
        }
    }

    /// Ids kept beyond the live ones: at least a quarter of the live count plus 64, and
    /// always room for a whole batch of `count`.
    func idSpaceLimit(forAllocating count: Int) -> UInt64 {
        let live = UInt64(max(0, liveCount + count))
        return max(limit, live + live / 4 + 64 + UInt64(count))
    }

    /// Grows the space so `count` allocations find free ids (call before a batch).
    func reserve(forAllocating count: Int) {
        extend(to: idSpaceLimit(forAllocating: count))
    }

    /// Raises ``highWater`` to what a writer reserving for `count` ids could reach now.
    func raiseHighWater(forAllocating count: Int) {
        highWater = max(highWater, limit, idSpaceLimit(forAllocating: count))
    }

    /// The next free id at or after the cursor, wrapping once, its leaf pinned (the
    /// caller retains it in the same operation). Ids are handed out in sweep order, so
    /// blocks written together get nearby ids and share block-table pages; that keeps
    /// compaction from rewriting the whole table (it moves a segment's blocks, which were
    /// written together). Whole leaves with no free id are skipped. The caller reserved
    /// the batch with ``reserve(forAllocating:)``, so with a true live count a free id
    /// exists; a stored live count that is wrong (crafted) can leave none, which is
    /// reported as corruption.
    func allocate(load: Loader) throws -> UInt64 {
        guard let id = try nextFree(from: cursor, below: limit, load: load, pinning: true) else {
            throw PoolError.corrupt(structure: "refcount page", byteOffset: 0,
                                    detail: "no free block id below the limit \(limit), although the live count is \(liveCount) (the stored live count is wrong: run verify --repair)")
        }
        cursor = id + 1
        return id
    }

    /// The first id with count zero at or after `start` (wrapping to 1 once) below
    /// `end`; ids at or beyond ``limit`` count zero.
    private func nextFree(from start: UInt64, below end: UInt64, load: Loader, pinning: Bool) throws -> UInt64? {
        let perLeaf = UInt64(Self.perLeaf)
        var id = start >= end || start == 0 ? 1 : start
        var wrapped = false
        while true {
            if id >= end {
                guard !wrapped else { return nil }
                wrapped = true
                id = 1
                continue
            }
            if wrapped && id >= start { return nil }
            if id >= limit { return id }
            let leaf = id / perLeaf, first = leaf * perLeaf
            let node = try resident(Int(leaf), load: load)
            let stop = min(first + perLeaf, limit, end)
            if node.nonzero < Self.perLeaf {
                var index = Int(id - first)
                let last = Int(stop - first)
                while index < last && node.counts[index] != 0 { index += 1 }
                if index < last {
                    if pinning { hold(node, Int(leaf)) }
                    return first + UInt64(index)
                }
            }
            id = stop
        }
    }

    /// The ids the next `count` calls of ``allocate(load:)`` will return after
    /// ``reserve(forAllocating:)`` (computed without changing a count or the cursor).
    func peek(_ count: Int, load: Loader) throws -> [UInt64] {
        let reserved = idSpaceLimit(forAllocating: count)
        var result: [UInt64] = []
        result.reserveCapacity(count)
        var start = cursor
        while result.count < count {
            // Sweep order is cyclic: meeting the first id again means no more are free.
            guard let id = try nextFree(from: start, below: reserved, load: load, pinning: false),
                  id != result.first else { break }
            result.append(id)
            start = id + 1
        }
        return result
    }
}
