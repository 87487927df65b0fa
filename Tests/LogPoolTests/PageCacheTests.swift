import Dispatch
@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Synchronization
import Testing

/// The metadata cache on its own (Specs/COMMIT.md §3.1): the resident set stays within
/// the budget, dirty leaves are never dropped, a leaf used since the hand passed gets a
/// second chance, leaves a checkpoint wrote join and are trimmed, a failed read leaves
/// nothing half loaded, and concurrent readers always get a leaf's own words.
@Suite("Metadata cache")
struct PageCacheTests {
    struct Unreadable: Error {}

    /// Leaf `i`: its page at `(i + 1) * 4096`, and words only it has.
    func leaf(_ i: Int) -> TreeNode {
        TreeNode(kind: .blockTable, level: 0, words: [], children: [], disk: PagePointer(byteOffset: UInt64(i + 1) * 4096, checksum: UInt64(i)))
    }

    func words(of pointer: PagePointer) -> [UInt64] {
        [UInt64](repeating: pointer.byteOffset / 4096, count: 8)
    }

    @Test("the resident set stays within the budget; dropped leaves read back their own words")
    func budget() throws {
        let cache = PageCache(budgetByteCount: 4 * 4096)
        let leaves = (0..<20).map(leaf)
        for node in leaves {
            let got = try cache.words(of: node, load: words)
            #expect(got == words(of: node.disk))
            #expect(cache.residentCount <= 4)
        }
        #expect(cache.loadCount == 20 && cache.evictionCount == 16)
        #expect(leaves.filter { !$0.words.isEmpty }.count == 4, "exactly the budget stays resident")
        // A dropped leaf comes back with its own words.
        let got = try cache.words(of: leaves[0], load: words)
        #expect(got == words(of: leaves[0].disk) && cache.loadCount == 21)
    }

    @Test("a miss whose page another reader installed meanwhile uses the installed words, and the leaf joins the ring once")
    func missRacesInstall() throws {
        let cache = PageCache(budgetByteCount: 4 * 4096)
        let node = leaf(0)
        var nested: [UInt64] = []
        // The page is read outside the cache's mutex, so a second reader can miss and
        // install the same leaf while the first one's read is in flight: here, from
        // inside the first one's load.
        let got = try cache.words(of: node) { pointer in
            nested = try cache.words(of: node) { _ in [7, 7, 7] }
            return words(of: pointer)
        }
        #expect(nested == [7, 7, 7] && got == [7, 7, 7], "the second install must not replace the first: \(got)")
        #expect(node.words == [7, 7, 7])
        #expect(cache.residentCount == 1 && cache.loadCount == 1)
    }

    @Test("dirty leaves are never dropped; they are the only copy until a checkpoint writes them")
    func dirtyPinned() throws {
        let cache = PageCache(budgetByteCount: 2 * 4096)
        let pinned = (0..<3).map(leaf)
        for node in pinned {
            _ = try cache.words(of: node, load: words)
            node.disk = .none
            node.words[0] = 999
        }
        for i in 3..<30 { _ = try cache.words(of: leaf(i), load: words) }
        for node in pinned {
            #expect(node.words.first == 999, "a dirty leaf lost its words")
        }
        // Written again (clean), they can go.
        for (i, node) in pinned.enumerated() { node.disk = PagePointer(byteOffset: UInt64(100 + i) * 4096, checksum: 0) }
        cache.admit(pinned)
        #expect(cache.residentCount <= 2)
    }

    @Test("a leaf used since the hand passed survives one sweep over one that was not")
    func secondChance() throws {
        let cache = PageCache(budgetByteCount: 3 * 4096)
        let (a, b, c, d, e) = (leaf(0), leaf(1), leaf(2), leaf(3), leaf(4))
        for node in [a, b, c] { _ = try cache.words(of: node, load: words) }
        // Over budget: the sweep clears every mark and drops the oldest.
        _ = try cache.words(of: d, load: words)
        #expect(a.words.isEmpty && !b.words.isEmpty && !c.words.isEmpty && !d.words.isEmpty)
        // b is used again, c is not: the next load drops c and keeps b.
        _ = try cache.words(of: b, load: words)
        _ = try cache.words(of: e, load: words)
        #expect(c.words.isEmpty && !b.words.isEmpty && !d.words.isEmpty && !e.words.isEmpty)
    }

    @Test("leaves a checkpoint wrote join the cache, which is trimmed back to its budget")
    func admitTrims() throws {
        let cache = PageCache(budgetByteCount: 3 * 4096)
        let written = (0..<10).map { i -> TreeNode in
            let node = TreeNode(kind: .blockTable, level: 0)
            node.disk = PagePointer(byteOffset: UInt64(i + 1) * 4096, checksum: 0)
            return node
        }
        cache.admit(written)
        #expect(cache.residentCount == 3)
        #expect(written.filter { !$0.words.isEmpty }.count == 3)
        // A dirty leaf in the list is not admitted (it is still the only copy, outside the ring).
        let dirty = TreeNode(kind: .blockTable, level: 0)
        cache.admit([dirty])
        #expect(!dirty.inCache && !dirty.words.isEmpty)
    }

    @Test("a failed read leaves the leaf unloaded and the cache as it was")
    func failedLoad() throws {
        let cache = PageCache(budgetByteCount: 2 * 4096)
        let a = leaf(0), b = leaf(1)
        _ = try cache.words(of: a, load: words)
        #expect(throws: Unreadable.self) { try cache.words(of: b) { _ in throw Unreadable() } }
        #expect(b.words.isEmpty && !b.inCache && cache.residentCount == 1 && !a.words.isEmpty)
        #expect(try cache.words(of: b, load: words) == words(of: b.disk))
    }

    @Test("readers on several threads always get a leaf's own words while others drop it (seeded)")
    func concurrentReaders() {
        let cache = PageCache(budgetByteCount: 3 * 4096)
        let leaves = (0..<16).map(leaf)
        let failures = Mutex<[String]>([])
        let box = UncheckedBox(leaves)
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            var rng = SeededGenerator(seed: UInt64(31 + t))
            for step in 0..<5000 {
                let node = box.value[Int(rng.next() % 16)]
                do {
                    let got = try cache.words(of: node) { pointer in [UInt64](repeating: pointer.byteOffset / 4096, count: 8) }
                    if got != [UInt64](repeating: node.disk.byteOffset / 4096, count: 8) {
                        failures.withLock { $0.append("seed \(31 + t) step \(step): leaf at \(node.disk.byteOffset) read \(got.prefix(2))") }
                    }
                } catch {
                    failures.withLock { $0.append("seed \(31 + t) step \(step): \(error)") }
                }
            }
        }
        let found = failures.withLock { $0 }
        #expect(found.isEmpty, "\(found.prefix(3))")
        #expect(cache.residentCount <= 3)
    }

    /// Format 2 (issue 11, COMMIT §4 step 4): a cleanly closed pool opens without reading
    /// a block-table leaf (usage from the root, holes later, appends resumed at the
    /// root's resumeByteOffset), and a crashed one reads only the leaves its replay
    /// touches (usage from the root, kept by replay's `apply`). Both match the figures of
    /// a full rebuild, and writes after them land where it is safe (the pools verify
    /// clean).
    @Test("a clean open reads no leaf page; a crashed one only those replay touches")
    func cleanOpenReadsNoLeaf() throws {
        let (pool, device) = try makePool(capacity: 16 << 20)
        let v = try pool.createVolume(name: "v", size: 4 << 20)
        try v.write(at: 0, from: pattern(3 << 20, seed: 7))
        try pool.snapshot(source: "v", name: "s")
        try pool.checkpoint()
        try v.write(at: 1 << 20, from: pattern(64 << 10, seed: 8))
        try pool.sync()
        let crashed = device.currentImage
        try pool.close()
        let clean = device.currentImage
        let cleanDevice = SimulatedDevice(image: clean)
        let cleanPool = try Pool.open(on: cleanDevice)
        #expect(cleanPool.engine.pageCache.loadCount == 0, "a clean open loaded \(cleanPool.engine.pageCache.loadCount) leaves")
        // 768 blocks fill 5 table leaves; the 16 new ids replay adds lie in one of them,
        // and the 16 blocks it maps in one map leaf (both kinds of leaf are read on use).
        let crashedDevice = SimulatedDevice(image: crashed)
        let crashedPool = try Pool.open(on: crashedDevice)
        #expect(crashedPool.recoveryReport.replayedRecordCount > 0 && crashedPool.engine.pageCache.loadCount <= 2,
                "a crashed open loaded \(crashedPool.engine.pageCache.loadCount) leaves: \(crashedPool.recoveryReport)")
        let crashedRebuilt = try Pool.openRebuildingCounts(on: SimulatedDevice(image: crashed))
        #expect(crashedPool.engine.dataLiveByteCounts == crashedRebuilt.engine.dataLiveByteCounts)
        #expect(crashedPool.engine.metaLiveByteCounts == crashedRebuilt.engine.metaLiveByteCounts)
        try crashedPool.openVolume(name: "v").write(at: 3 << 20, from: pattern(64 << 10, seed: 10))
        try crashedPool.close()
        let crashedReport = try Pool.verify(on: SimulatedDevice(image: crashedDevice.currentImage))
        #expect(crashedReport.problems.isEmpty, "\(crashedReport.problems)")
        let rebuilt = try Pool.openRebuildingCounts(on: SimulatedDevice(image: clean))
        #expect(cleanPool.engine.dataLiveByteCounts == rebuilt.engine.dataLiveByteCounts)
        #expect(cleanPool.engine.metaLiveByteCounts == rebuilt.engine.metaLiveByteCounts)
        #expect(cleanPool.stats.usedBytes == rebuilt.stats.usedBytes)
        let w = try cleanPool.openVolume(name: "v")
        #expect(try w.read(at: 0, length: 1 << 20) == pattern(1 << 20, seed: 7))
        try w.write(at: 2 << 20, from: pattern(64 << 10, seed: 9))
        try cleanPool.close()
        let report = try Pool.verify(on: SimulatedDevice(image: cleanDevice.currentImage))
        #expect(report.problems.isEmpty, "\(report.problems)")
    }
    /// Where map leaf `child` of `volume`'s (two-level) map lies in `image`, with the
    /// root's level and the leaves the read-only open loaded to find it.
    private func mapLeaf(_ image: [UInt8], volume: String, child: Int) throws -> (offset: UInt64, rootLevel: Int, loads: Int) {
        let reader = try Pool.open(on: SimulatedDevice(image: image), mode: .readOnly)
        let root = try #require(reader.engine.catalog.volume(named: volume)!.map.root)
        return (try #require(root.children[child]).disk.byteOffset, root.level, reader.engine.pageCache.loadCount)
    }

    /// A map leaf that leaves every tree (delete, discard, shrink) leaves the cache too,
    /// dirty or not: a dirty leaf is never evicted, so a released one used to stay pinned
    /// for good and the ring grew past its budget with every overwrite-then-delete.
    /// And a delete whose map has an unreadable leaf still deletes (it reads nothing:
    /// the map joins the release queue), while the release step that would read the
    /// leaf is refused before its record is journaled, so the handle goes on.
    @Test("released map leaves leave the cache; a release step that cannot read a leaf changes nothing")
    func releasedLeavesLeaveTheCache() throws {
        let device = SimulatedDevice(byteCount: 64 << 20)
        let budget = 16
        let pool = try Pool.create(on: device, capacity: 64 << 20, blockSize: 4096, segmentSize: 64 << 10, compression: .none,
                                   metadataCacheBytes: budget * 4096)
        let fanout = UInt64(PageLayout.mapLeafFanout) * 4096
        for round in 0..<12 {
            let v = try pool.createVolume(name: "v\(round)", size: 8 << 20)
            try v.write(at: 0, from: pattern(8 << 20, seed: UInt8(round)))
            try pool.checkpoint()
            // One block in each of the 5 leaves: dirty in place, in the ring.
            for leaf in 0..<4 { try v.write(at: UInt64(leaf) * fanout, from: pattern(4096, seed: 99)) }
            try pool.delete(name: "v\(round)")
            _ = try pool.createVolume(name: "w\(round)", size: 1 << 20).read(at: 0, length: 4096)
        }
        #expect(pool.engine.pageCache.residentCount <= budget + 8, "ring holds \(pool.engine.pageCache.residentCount) leaves, budget \(budget)")
        #expect(pool.internalConsistencyProblems().isEmpty)

        let keep = try pool.createVolume(name: "keep", size: 8 << 20)
        try keep.write(at: 0, from: pattern(8 << 20, seed: 3))
        try pool.close()
        var image = device.currentImage
        let leaf = try mapLeaf(image, volume: "keep", child: 1).offset
        image[Int(leaf) + 64] ^= 4
        let damaged = SimulatedDevice(image: image)
        let reopened = try Pool.open(on: damaged)
        try reopened.delete(name: "keep")
        #expect(reopened.engine.poisonCause == nil, "the release step was refused before journaling: the handle goes on")
        #expect(reopened.engine.catalog.volume(named: "keep") == nil && reopened.stats.deletedMapsReleasing == 1,
                "the map waits in the release queue, its blocks still referenced")
        // Compaction cannot move the damaged page itself (as for any volume's), but
        // the release step before it leaves the map in the queue without failing.
        _ = try? reopened.compact()
        #expect(reopened.engine.poisonCause == nil && reopened.stats.deletedMapsReleasing == 1,
                "the map it cannot read stays queued; nothing is poisoned")
        try reopened.close()
        #expect(try Pool.open(on: damaged).stats.deletedMapsReleasing == 1, "and the pool still opens")
    }

    /// ARCHITECTURE §5 step 2: open reads no map leaf; a leaf is read on first use
    /// through the cache, so a damaged one fails only the calls that reach it (with
    /// `corrupt(map page)` naming it), while the rest of the volume, other volumes and
    /// writes elsewhere go on, and a one-page cache serves all of it.
    @Test("map leaves are read on first use: a damaged one fails only the calls that reach it")
    func lazyMapLeaves() throws {
        let (pool, device) = try makePool(capacity: 32 << 20)
        let v = try pool.createVolume(name: "v", size: 8 << 20)  // 2,048 blocks: 5 map leaves
        try v.write(at: 0, from: pattern(8 << 20, seed: 5))
        let w = try pool.createVolume(name: "w", size: 1 << 20)
        try w.write(at: 0, from: pattern(1 << 20, seed: 6))
        try pool.close()
        var image = device.currentImage
        let (leaf, rootLevel, loads) = try mapLeaf(image, volume: "v", child: 2)
        #expect(rootLevel == 1 && loads == 0, "open read no leaf")
        image[Int(leaf) + 100] ^= 1
        let damaged = SimulatedDevice(image: image)
        let reopened = try Pool.open(on: damaged, metadataCacheBytes: 4096)
        let v2 = try reopened.openVolume(name: "v")
        let fanout = PageLayout.mapLeafFanout, expected = pattern(8 << 20, seed: 5)
        // Leaves 0 and 1 (blocks 0..<1018) read back through a one-page cache.
        #expect(try v2.read(at: 0, length: 2 * fanout * 4096) == Array(expected[0..<(2 * fanout * 4096)]))
        let error = #expect(throws: PoolError.self) { try v2.read(at: UInt64(2 * fanout * 4096), length: 4096) }
        if case .corrupt(let structure, let offset, _)? = error {
            #expect(structure == "map page" && (leaf..<leaf + 4096).contains(offset), "\(String(describing: error))")
        } else {
            Issue.record("not corrupt(map page): \(String(describing: error))")
        }
        #expect(try v2.read(at: UInt64(3 * fanout * 4096), length: 4096) == Array(expected[(3 * fanout * 4096)..<(3 * fanout * 4096 + 4096)]))
        #expect(try reopened.openVolume(name: "w").read(at: 0, length: 1 << 20) == pattern(1 << 20, seed: 6))
        try v2.write(at: 0, from: pattern(64 << 10, seed: 9))
        #expect(try v2.read(at: 0, length: 64 << 10) == pattern(64 << 10, seed: 9))
        #expect(reopened.engine.pageCache.evictionCount > 0 && reopened.engine.pageCache.residentCount <= 3)
        try reopened.close()
        let report = try Pool.verify(on: SimulatedDevice(image: damaged.currentImage))
        // (Verify's own replay, which rebuilds every count from the maps, cannot load the
        // pool either: `journal-not-checked`, as before leaves were read on use.)
        #expect(report.problems.contains { $0.code == "page-damaged" && $0.byteOffset == leaf }, "\(report.problems)")
    }

    /// Deriving the counts from the maps (verify, repair, a damaged refcount leaf) with a
    /// refcount budget of one leaf: the derived leaves must stay resident until compared
    /// with the stored ones. Clean, they were dropped and read back as zeros, which then
    /// "differed" from the stored counts: every count but the last leaf's was lost (the
    /// crash simulation's --long run with a one-page cache found it).
    @Test("counts derived with a one-leaf refcount budget survive the comparison with the stored tree")
    func deriveWithTinyBudget() throws {
        let (pool, device) = try makePool(capacity: 16 << 20, blockSize: 512)
        let v = try pool.createVolume(name: "v", size: 4000 * 512)
        try v.write(at: 0, from: pattern(4000 * 512, seed: 4))  // ids 1...4000: 4 refcount leaves
        // Overwritten, the first 1,100 blocks free their ids (leaf 0 counts nothing) and
        // take new ones past 4000: a leaf of zeros comes before leaves with counts.
        try v.write(at: 0, from: pattern(1100 * 512, seed: 5))
        try pool.snapshot(source: "v", name: "s")
        try pool.close()
        let engine = try Engine.open(device: SimulatedDevice(image: device.currentImage), readOnly: true,
                                     rebuildCounts: true, metadataCacheByteCount: 4096)
        #expect(engine.refcountBudgetLeafCount == 1 && BlockIDs.leafCount(engine.blockIDLimit) >= 4)
        #expect(try engine.refcount(1) == 0 && engine.refcount(2000) == 1, "leaf 0 is all zeros, leaf 1 counts")
        #expect(engine.ids.changedLeafCount == 0, "a clean pool's stored counts equal the derived ones")
        #expect(engine.checkInvariants() == [])
        let report = try Pool.verify(on: SimulatedDevice(image: device.currentImage))
        #expect(report.problems.isEmpty, "\(report.problems)")
    }
}

/// Hands the test's tree nodes (a class the engine guards with its own locks) to the
/// reader threads; the cache is what synchronises their words.
private final class UncheckedBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
