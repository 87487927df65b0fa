@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// The block-id space on its own (issue 11: components with tests of their own): the live
/// count stays the number of nonzero refcounts, allocation sweeps and never hands out a
/// referenced id, `peek` predicts `allocate`, and the id space stays bounded by the live
/// count.
@Suite("Block ids")
struct BlockIDsTests {
    /// Stored refcount leaves, as the refcount tree would hold them: a checkpoint writes
    /// the changed leaves here, and leaves not resident are read back from here.
    final class Store {
        var leaves: [Int: [UInt64]] = [:]
        var reads = 0
        func load(_ leaf: Int) -> [UInt64] {
            reads += 1
            return leaves[leaf] ?? []
        }
        func checkpoint(_ ids: BlockIDs) throws {
            for leaf in ids.takeChangedLeaves() { leaves[leaf] = try ids.packedWords(leaf: leaf, load: load) }
        }
    }

    func counts(_ ids: BlockIDs, _ store: Store) throws -> [UInt32] {
        try (0..<ids.limit).map { try ids.refcount($0, load: store.load) }
    }

    func check(_ ids: BlockIDs, _ store: Store, _ context: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let all = try counts(ids, store)
        #expect(ids.liveCount == all.reduce(0) { $0 + ($1 > 0 ? 1 : 0) }, "\(context): live count drifted",
                sourceLocation: sourceLocation)
        #expect(all[0] == 0, "\(context): id 0 referenced", sourceLocation: sourceLocation)
    }

    @Test("seeded allocations, retains and releases keep the live count, never reuse a live id, and peek predicts allocate, with leaves paged out")
    func seededModel() throws {
        for seed in UInt64(1)...20 {
            var generator = SeededGenerator(seed: seed)
            // A budget of one leaf: every other leaf is read back from the store.
            let ids = BlockIDs(budgetLeafCount: 1)
            let store = Store()
            var model: [UInt64: UInt32] = [:]
            for step in 0..<400 {
                let context = "seed \(seed) step \(step)"
                switch Int.random(in: 0..<4, using: &generator) {
                case 0:
                    // A batch, as a write takes it: reserve, peek, allocate, map each once.
                    let count = Int.random(in: 1...40, using: &generator)
                    ids.reserve(forAllocating: count)
                    let predicted = try ids.peek(count, load: store.load)
                    var taken: [UInt64] = []
                    for _ in 0..<count {
                        let id = try ids.allocate(load: store.load)
                        #expect(id >= 1 && id < ids.limit, "\(context): id \(id) outside 1..<\(ids.limit)")
                        #expect(model[id] == nil, "\(context): allocated live id \(id)")
                        try ids.retain(id, load: store.load)
                        model[id] = 1
                        taken.append(id)
                    }
                    #expect(taken == predicted, "\(context): peek \(predicted), allocate \(taken)")
                case 1:
                    // A leaf copied: every live id it names gains a reference.
                    if let id = model.keys.randomElement(using: &generator) {
                        try ids.retain(id, load: store.load)
                        model[id, default: 0] += 1
                    }
                case 2:
                    // A checkpoint: changed leaves are written and may be dropped after.
                    try store.checkpoint(ids)
                    #expect(ids.changedLeafCount == 0, "\(context)")
                default:
                    if let id = model.keys.randomElement(using: &generator) {
                        let freed = try ids.release(id, load: store.load) == true
                        model[id]! -= 1
                        if model[id] == 0 {
                            model[id] = nil
                            #expect(freed, "\(context): the last release of \(id) did not free it")
                        } else {
                            #expect(!freed, "\(context): release of \(id) with references left freed it")
                        }
                    }
                }
                #expect(ids.heldCountIsExact, "\(context): held count drifted before unpinning")
                ids.unpinAll()
                #expect(ids.heldCountIsExact, "\(context): held count drifted")
                // Every id's count (not only the model's) every 16th step and at the end:
                // each full pass reads every leaf back, which made this test alone run
                // for two minutes in a debug build when done at every step.
                if step % 16 == 15 || step == 399 { try check(ids, store, context) }
                #expect(ids.liveCount == model.count, "\(context): live \(ids.liveCount), model \(model.count)")
                // In id order: with a budget of one leaf, each leaf is then read back once.
                for (id, count) in model.sorted(by: { $0.key < $1.key }) {
                    #expect(try ids.refcount(id, load: store.load) == count, "\(context): id \(id)")
                }
                // The id space stays within a quarter of the live count plus slack and a batch.
                let bound = UInt64(ids.liveCount + 40) * 5 / 4 + 64 + 40
                #expect(ids.limit <= bound, "\(context): limit \(ids.limit) beyond \(bound)")
                // Clean leaves beyond the budget are dropped; changed ones stay.
                #expect(ids.residentLeafCount <= max(1, ids.changedLeafCount + 1), "\(context): \(ids.residentLeafCount) leaves resident, \(ids.changedLeafCount) changed")
            }
            #expect(store.reads > 0, "seed \(seed): leaves were read back")
        }
    }

    @Test("every count change marks its refcount leaf, packed words round-trip through a reload, and a zero count does not release")
    func storedCounts() throws {
        let perLeaf = UInt64(PageLayout.refcountsPerLeaf)
        let store = Store()
        let ids = BlockIDs(limit: 3 * perLeaf + 10)
        try ids.retain(5, load: store.load)
        try ids.retain(perLeaf * 2 + 1, load: store.load)
        try ids.retain(perLeaf * 2 + 1, load: store.load)
        #expect(ids.changedLeafCount == 2)
        #expect(ids.takeChangedLeaves() == [0, 2])
        #expect(ids.changedLeafCount == 0 && ids.takeChangedLeaves().isEmpty)
        #expect(try ids.release(perLeaf * 2 + 1, load: store.load) == false)
        #expect(ids.takeChangedLeaves() == [2], "a release marks its leaf too")
        #expect(try ids.release(7, load: store.load) == nil, "releasing an id whose count is zero is refused, not trapped")
        #expect(ids.changedLeafCount == 0, "a refused release changes nothing")
        let words = try ids.packedWords(leaf: 2, load: store.load)
        #expect(words[0] == UInt64(1) << 32, "id 2*1018+1 is the high half of the leaf's first word")
        for leaf in 0..<BlockIDs.leafCount(ids.limit) { store.leaves[leaf] = try ids.packedWords(leaf: leaf, load: store.load) }
        let loaded = BlockIDs(limit: ids.limit, liveCount: ids.liveCount, budgetLeafCount: 1)
        #expect(try counts(loaded, store) == counts(ids, store) && loaded.changedLeafCount == 0)
        #expect(loaded.residentLeafCount == 1, "reading every count kept one leaf resident")
        #expect(try !loaded.differs(leaf: 2, from: store.leaves[2]!, load: store.load))
        #expect(try loaded.differs(leaf: 0, from: store.leaves[2]!, load: store.load))
        let limit: UInt64 = 4
        func problem(_ leaf: UInt64, _ words: [UInt64]) -> String? {
            BlockIDs.storedLeafProblem(leaf: leaf, words: words + [UInt64](repeating: 0, count: 509 - words.count), limit: limit)
        }
        #expect(problem(0, [UInt64(1) << 32]) == nil, "id 1 may be counted")
        #expect(problem(0, [1]) != nil, "id 0 is never counted")
        #expect(problem(0, [0, 0, 1]) != nil, "id 4 is beyond the limit")
        #expect(problem(0, [0, UInt64(BlockIDs.storedCountMax) + 1]) != nil, "a count above the stored maximum is refused")
        // A crafted tree can put a leaf where leaf x 1018 overflows: refused, not trapped.
        for leaf in [UInt64(1), 1 << 54, UInt64.max / UInt64(PageLayout.wordCapacity), .max] {
            #expect(problem(leaf, [0, 1]) != nil, "leaf \(leaf)")
            #expect(problem(leaf, []) == nil, "an empty leaf \(leaf) holds nothing wrong")
        }
    }

    @Test("pinned and changed leaves stay resident past the budget; unpinning drops the clean ones")
    func pinning() throws {
        let perLeaf = UInt64(PageLayout.refcountsPerLeaf)
        let store = Store()
        let ids = BlockIDs(limit: 8 * perLeaf, budgetLeafCount: 2)
        for leaf in 0..<6 { try ids.pin(UInt64(leaf) * perLeaf + 1, load: store.load) }
        #expect(ids.residentLeafCount == 6, "pinned leaves are never dropped")
        try ids.retain(7 * perLeaf + 3, load: store.load)
        #expect(ids.heldCountIsExact)
        ids.unpinAll()
        #expect(ids.heldCountIsExact)
        #expect(ids.residentLeafCount == 3 && ids.isChanged(leaf: 7), "unpinned clean leaves dropped to the budget (2), the changed one kept beside them")
        let reads = store.reads
        #expect(try ids.refcount(7 * perLeaf + 3, load: store.load) == 1)
        #expect(store.reads == reads, "a changed leaf is never read back")
        // A loader failure is the caller's error, and nothing changes.
        struct Damaged: Error {}
        #expect(throws: Damaged.self) { try ids.retain(5 * perLeaf, load: { _ in throw Damaged() }) }
        #expect(ids.liveCount == 1)
    }

    @Test("allocation sweeps forward and wraps to 1, skipping live ids")
    func sweep() throws {
        let store = Store()
        let ids = BlockIDs(limit: 8)
        for id: UInt64 in [2, 3, 6] { try ids.retain(id, load: store.load) }
        // Cursor starts at 1: 1, then 4, 5, 7, then wraps past the limit to 1 again.
        var got: [UInt64] = []
        for _ in 0..<4 { got.append(try ids.allocate(load: store.load)) }
        #expect(got == [1, 4, 5, 7])
        #expect(try ids.allocate(load: store.load) == 1, "the sweep wraps to id 1 (1 is still unreferenced)")
        #expect(ids.limit == 8, "allocate never grows the space")
        // A live count that claims fewer ids than are referenced (crafted) cannot trap.
        let full = BlockIDs(limit: 4)
        for id: UInt64 in 1...3 { try full.retain(id, load: store.load) }
        #expect(throws: PoolError.self) { try full.allocate(load: store.load) }
    }

    @Test("the high-water mark only rises, and covers what a reserve could reach")
    func highWater() throws {
        let store = Store()
        let ids = BlockIDs()
        ids.raiseHighWater(forAllocating: 10)
        let first = ids.highWater
        #expect(first == ids.idSpaceLimit(forAllocating: 10))
        ids.reserve(forAllocating: 10)
        for _ in 0..<10 { try ids.retain(try ids.allocate(load: store.load), load: store.load) }
        ids.raiseHighWater(forAllocating: 1)
        #expect(ids.highWater >= first && ids.highWater >= ids.limit)
        let before = ids.highWater
        for id in 1..<ids.limit where try ids.refcount(id, load: store.load) > 0 { _ = try ids.release(id, load: store.load) }
        ids.raiseHighWater(forAllocating: 1)
        #expect(ids.highWater == before, "a smaller live count never lowers the mark")
    }

    @Test("ids beyond the limit read as unreferenced; extend never shrinks")
    func beyondLimit() throws {
        let store = Store()
        let ids = BlockIDs(limit: 4)
        #expect(try ids.refcount(100, load: store.load) == 0)
        ids.extend(to: 2)
        #expect(ids.limit == 4)
        ids.extend(to: 9)
        #expect(ids.limit == 9)
        try check(ids, store, "after extend")
    }
}
