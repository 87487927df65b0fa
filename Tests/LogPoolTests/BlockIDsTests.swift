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
    func check(_ ids: BlockIDs, _ context: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(ids.liveCount == ids.refcounts.reduce(0) { $0 + ($1 > 0 ? 1 : 0) }, "\(context): live count drifted",
                sourceLocation: sourceLocation)
        #expect(ids.refcounts.count == Int(ids.limit), "\(context): refcounts not \(ids.limit) long",
                sourceLocation: sourceLocation)
        #expect(ids.refcount(0) == 0, "\(context): id 0 referenced", sourceLocation: sourceLocation)
    }

    @Test("seeded allocations, retains and releases keep the live count, never reuse a live id, and peek predicts allocate")
    func seededModel() {
        for seed in UInt64(1)...20 {
            var generator = SeededGenerator(seed: seed)
            var ids = BlockIDs()
            var model: [UInt64: UInt32] = [:]
            for step in 0..<400 {
                let context = "seed \(seed) step \(step)"
                switch Int.random(in: 0..<3, using: &generator) {
                case 0:
                    // A batch, as a write takes it: reserve, peek, allocate, map each once.
                    let count = Int.random(in: 1...12, using: &generator)
                    ids.reserve(forAllocating: count)
                    let predicted = ids.peek(count)
                    var taken: [UInt64] = []
                    for _ in 0..<count {
                        let id = ids.allocate()
                        #expect(id >= 1 && id < ids.limit, "\(context): id \(id) outside 1..<\(ids.limit)")
                        #expect(model[id] == nil, "\(context): allocated live id \(id)")
                        ids.retain(id)
                        model[id] = 1
                        taken.append(id)
                    }
                    #expect(taken == predicted, "\(context): peek \(predicted), allocate \(taken)")
                case 1:
                    // A leaf copied: every live id it names gains a reference.
                    guard let id = model.keys.randomElement(using: &generator) else { continue }
                    ids.retain(id)
                    model[id, default: 0] += 1
                default:
                    guard let id = model.keys.randomElement(using: &generator) else { continue }
                    let freed = ids.release(id) == true
                    model[id]! -= 1
                    if model[id] == 0 {
                        model[id] = nil
                        #expect(freed, "\(context): the last release of \(id) did not free it")
                    } else {
                        #expect(!freed, "\(context): release of \(id) with references left freed it")
                    }
                }
                check(ids, context)
                #expect(ids.liveCount == model.count, "\(context): live \(ids.liveCount), model \(model.count)")
                for (id, count) in model { #expect(ids.refcount(id) == count, "\(context): id \(id)") }
                // The id space stays within a quarter of the live count plus slack and a batch.
                let bound = UInt64(ids.liveCount + 12) * 5 / 4 + 64 + 12
                #expect(ids.limit <= bound, "\(context): limit \(ids.limit) beyond \(bound)")
            }
        }
    }

    @Test("every count change marks its refcount leaf, packed words round-trip through load, and a zero count does not release")
    func storedCounts() {
        let perLeaf = UInt64(PageLayout.refcountsPerLeaf)
        var ids = BlockIDs(limit: 3 * perLeaf + 10)
        ids.retain(5)
        ids.retain(perLeaf * 2 + 1)
        ids.retain(perLeaf * 2 + 1)
        #expect(ids.changedLeafCount == 2)
        #expect(ids.takeChangedLeaves() == [0, 2])
        #expect(ids.changedLeafCount == 0 && ids.takeChangedLeaves().isEmpty)
        #expect(ids.release(perLeaf * 2 + 1) == false)
        #expect(ids.takeChangedLeaves() == [2], "a release marks its leaf too")
        #expect(ids.release(7) == nil, "releasing an id whose count is zero is refused, not trapped")
        #expect(ids.changedLeafCount == 0, "a refused release changes nothing")
        let words = ids.packedWords(leaf: 2)
        #expect(words[0] == UInt64(1) << 32, "id 2*1018+1 is the high half of the leaf's first word")
        var loaded = BlockIDs(limit: ids.limit)
        for leaf in 0..<BlockIDs.leafCount(ids.limit) {
            #expect(loaded.load(leaf: UInt64(leaf), words: ids.packedWords(leaf: leaf)) == nil)
        }
        #expect(loaded.refcounts == ids.refcounts && loaded.liveCount == ids.liveCount && loaded.changedLeafCount == 0)
        var bad = BlockIDs(limit: 4)
        #expect(bad.load(leaf: 0, words: [UInt64(1) << 32] + [UInt64](repeating: 0, count: 508)) == nil, "id 1 may be counted")
        #expect(bad.load(leaf: 0, words: [1] + [UInt64](repeating: 0, count: 508)) != nil, "id 0 is never counted")
        #expect(bad.load(leaf: 0, words: [0, 0, 1] + [UInt64](repeating: 0, count: 506)) != nil, "id 4 is beyond the limit")
        #expect(bad.load(leaf: 0, words: [0, UInt64(BlockIDs.storedCountMax) + 1] + [UInt64](repeating: 0, count: 507)) != nil,
                "a count above the stored maximum is refused")
        // A crafted tree can put a leaf where leaf x 1018 overflows: refused, not trapped.
        for leaf in [UInt64(1), 1 << 54, UInt64.max / UInt64(PageLayout.wordCapacity), .max] {
            #expect(bad.load(leaf: leaf, words: [0, 1] + [UInt64](repeating: 0, count: 507)) != nil, "leaf \(leaf)")
            #expect(bad.load(leaf: leaf, words: [UInt64](repeating: 0, count: 509)) == nil, "an empty leaf \(leaf) holds nothing wrong")
        }
        #expect(bad.refcounts == [0, 1, 0, 0] && bad.liveCount == 1, "refused leaves loaded nothing")
    }

    @Test("allocation sweeps forward and wraps to 1, skipping live ids")
    func sweep() {
        var ids = BlockIDs(limit: 8)
        for id: UInt64 in [2, 3, 6] { ids.retain(id) }
        // Cursor starts at 1: 1, then 4, 5, 7, then wraps past the limit to 1 again.
        var got: [UInt64] = []
        for _ in 0..<4 { got.append(ids.allocate()) }
        #expect(got == [1, 4, 5, 7])
        #expect(ids.allocate() == 1, "the sweep wraps to id 1 (1 is still unreferenced)")
        #expect(ids.limit == 8, "allocate never grows the space")
    }

    @Test("the high-water mark only rises, and covers what a reserve could reach")
    func highWater() {
        var ids = BlockIDs()
        ids.raiseHighWater(forAllocating: 10)
        let first = ids.highWater
        #expect(first == ids.idSpaceLimit(forAllocating: 10))
        ids.reserve(forAllocating: 10)
        for _ in 0..<10 { ids.retain(ids.allocate()) }
        ids.raiseHighWater(forAllocating: 1)
        #expect(ids.highWater >= first && ids.highWater >= ids.limit)
        let before = ids.highWater
        for id in 1..<ids.limit where ids.refcount(id) > 0 { _ = ids.release(id) }
        ids.raiseHighWater(forAllocating: 1)
        #expect(ids.highWater == before, "a smaller live count never lowers the mark")
    }

    @Test("ids beyond the limit read as unreferenced; extend never shrinks")
    func beyondLimit() {
        var ids = BlockIDs(limit: 4)
        #expect(ids.refcount(100) == 0)
        ids.extend(to: 2)
        #expect(ids.limit == 4)
        ids.extend(to: 9)
        #expect(ids.limit == 9)
        check(ids, "after extend")
    }
}
