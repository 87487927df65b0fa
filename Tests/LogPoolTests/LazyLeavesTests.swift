import Dispatch
@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Synchronization
import Testing

/// Leaf nodes created on first use (COMMIT §3.2): open makes nodes for interior pages
/// only; the first use of a level-1 node's children creates the leaves of every level-1
/// node at the same place at once, so shared leaves get their exact parent counts. The
/// invariant check compares every node's parent count with the parents it finds, and
/// every count and usage figure with the trees, without creating leaves itself.
@Suite("Leaf nodes created on first use")
struct LazyLeavesTests {
    /// 1,024 blocks: maps of height 2, whose roots are level-1 nodes at block index 0.
    static let volumeSize: UInt64 = 4 << 20

    /// What each volume holds, block by block (nil: never written, reads as zeros).
    typealias Model = [String: [UInt8]]

    /// A pool where three maps of height 2 share leaves: `v` written whole, snapshot
    /// `s`, `v` overwritten at blocks 5 and 800 (its root copied: the other leaves now
    /// have two parents), clone `c` of `s` written at block 600. Closed cleanly.
    static func sharedPool() throws -> (SimulatedDevice, Model) {
        let (pool, device) = try makePool(capacity: 32 << 20)
        let v = try pool.createVolume(name: "v", size: volumeSize)
        var model: Model = [:]
        var bytes = [UInt8](repeating: 0, count: Int(volumeSize))
        for chunk in 0..<4 {
            let data = pattern(1 << 20, seed: UInt8(chunk + 1))
            try v.write(at: UInt64(chunk << 20), from: data)
            bytes.replaceSubrange(chunk << 20..<(chunk + 1) << 20, with: data)
        }
        _ = try pool.snapshot(source: "v", name: "s")
        model["s"] = bytes
        for block in [5, 800] {
            let data = pattern(4096, seed: UInt8(block % 251))
            try v.write(at: UInt64(block * 4096), from: data)
            bytes.replaceSubrange(block * 4096..<(block + 1) * 4096, with: data)
        }
        model["v"] = bytes
        let c = try pool.clone(source: "s", name: "c")
        var cloneBytes = model["s"]!
        let data = pattern(4096, seed: 99)
        try c.write(at: 600 * 4096, from: data)
        cloneBytes.replaceSubrange(600 * 4096..<601 * 4096, with: data)
        model["c"] = cloneBytes
        #expect(pool.internalConsistencyProblems() == [])
        try pool.close()
        return (device, model)
    }

    static func rootIsLazy(_ pool: Pool, _ name: String) -> Bool {
        pool.locked {
            guard let id = pool.engine.volumeIDsByName[name], let root = pool.engine.volumes[id]?.map.root else { return false }
            if case .pending = root.childrenSnapshot { return true }
            return false
        }
    }

    static func expectContents(_ pool: Pool, _ model: Model, sourceLocation: SourceLocation = #_sourceLocation) throws {
        for (name, bytes) in model.sorted(by: { $0.key < $1.key }) {
            let got = try pool.openVolume(name: name).read(at: 0, length: bytes.count)
            #expect(got == bytes, "\(name) reads back other bytes", sourceLocation: sourceLocation)
        }
    }

    /// Goal: open makes no leaf node (the roots keep their leaf pointers), and the
    /// invariant check, which walks every tree, creates none either.
    @Test("open and the invariant check create no leaf nodes")
    func openCreatesNoLeaves() throws {
        let (device, _) = try Self.sharedPool()
        let (pool, _) = try reopen(device)
        #expect(Self.rootIsLazy(pool, "v") && Self.rootIsLazy(pool, "s") && Self.rootIsLazy(pool, "c"))
        #expect(pool.internalConsistencyProblems() == [])
        #expect(Self.rootIsLazy(pool, "v"), "the check created leaves")
        #expect(pool.cacheEvents.sharedLeafCreations == 0)
    }

    /// What first touches the shared leaves after open.
    enum FirstUse: String, CaseIterable, CustomTestStringConvertible {
        case read, writeVolume, writeClone, deleteSnapshot, snapshotThenWrite, compact, discard
        var testDescription: String { rawValue }
    }

    /// Goal: whatever first creates the shared leaves (a read, a write through either
    /// parent, a delete's release steps, a discard, compaction), every parent count is
    /// exact, every volume reads back, and a reopen agrees. Method: the shared pool,
    /// reopened; the first use; the invariant check; more changes through every map;
    /// the check again; a reopen, its check and every volume read back.
    @Test("shared leaves created on first use have exact parent counts", arguments: FirstUse.allCases)
    func firstUse(_ use: FirstUse) throws {
        let (device, built) = try Self.sharedPool()
        var model = built
        let (pool, reopened) = try reopen(device)
        func write(_ name: String, block: Int, seed: UInt8) throws {
            let data = pattern(4096, seed: seed)
            try pool.openVolume(name: name).write(at: UInt64(block * 4096), from: data)
            model[name]!.replaceSubrange(block * 4096..<(block + 1) * 4096, with: data)
        }
        switch use {
        case .read: try Self.expectContents(pool, model)
        case .writeVolume: try write("v", block: 3, seed: 11)
        case .writeClone: try write("c", block: 3, seed: 12)
        case .deleteSnapshot:
            try pool.delete(name: "s")
            model["s"] = nil
        case .snapshotThenWrite:
            _ = try pool.snapshot(source: "c", name: "c2")
            model["c2"] = model["c"]
            try write("c", block: 900, seed: 13)
        case .compact: try pool.compact()
        case .discard:
            try pool.openVolume(name: "v").discard(at: 512 * 4096, length: 100 * 4096)
            model["v"]!.replaceSubrange(512 * 4096..<612 * 4096, with: [UInt8](repeating: 0, count: 100 * 4096))
        }
        #expect(pool.internalConsistencyProblems() == [], "after \(use)")
        #expect(pool.cacheEvents.sharedLeafCreations >= 1 || use == .compact, "the first use created no shared leaves")
        try write("v", block: 700, seed: 21)
        try write("c", block: 6, seed: 22)
        if model["s"] != nil {
            try pool.delete(name: "s")
            model["s"] = nil
        }
        try pool.compact()
        #expect(pool.internalConsistencyProblems() == [], "after more changes following \(use)")
        try Self.expectContents(pool, model)
        try pool.close()
        let (again, _) = try reopen(reopened)
        #expect(again.internalConsistencyProblems() == [])
        try Self.expectContents(again, model)
        #expect(try Pool.verify(on: SimulatedDevice(image: reopened.currentImage)).problems.isEmpty)
    }

    /// Goal: a one-level map's root leaf that is also child 0 of a grown map's root gets
    /// both parents at open, so releasing one of them never frees it under the other.
    /// Method: `v` of 100 blocks (height 1) written, snapshot `s` (the leaf has two
    /// parents), `v` grown to 4 MiB (the leaf becomes child 0 of v's new level-1 root)
    /// and written at block 700; reopen; delete `s`, overwrite `v`'s block 0 (the leaf
    /// now has one parent: changed in place), check, reopen, read back.
    @Test("a leaf root shared with child 0 of a grown map keeps both parents across open")
    func leafRootSharedWithGrownMap() throws {
        let (pool, device) = try makePool(capacity: 32 << 20)
        let v = try pool.createVolume(name: "v", size: 100 * 4096)
        let first = pattern(100 * 4096, seed: 7)
        try v.write(at: 0, from: first)
        _ = try pool.snapshot(source: "v", name: "s")
        _ = try pool.resize("v", size: Self.volumeSize)
        let far = pattern(4096, seed: 8)
        try v.write(at: 700 * 4096, from: far)
        try pool.close()
        let (reopened, reopenedDevice) = try reopen(device)
        #expect(reopened.internalConsistencyProblems() == [])
        try reopened.delete(name: "s")
        let zero = pattern(4096, seed: 9)
        try reopened.openVolume(name: "v").write(at: 0, from: zero)
        #expect(reopened.internalConsistencyProblems() == [])
        var expected = first + [UInt8](repeating: 0, count: Int(Self.volumeSize) - first.count)
        expected.replaceSubrange(0..<4096, with: zero)
        expected.replaceSubrange(700 * 4096..<701 * 4096, with: far)
        try reopened.close()
        let (again, _) = try reopen(reopenedDevice)
        #expect(again.internalConsistencyProblems() == [])
        #expect(try again.openVolume(name: "v").read(at: 0, length: expected.count) == expected)
    }

    /// Goal: readers on several threads that first touch the same shared leaves at once
    /// (under the shared lock) create them once, with exact counts. Method: the shared
    /// pool reopened; four threads read all of `v`, `s` and `c` in 64 KiB pieces in
    /// different orders, at once; the invariant check; every piece compared.
    @Test("readers on four threads create shared leaves once")
    func concurrentReaders() throws {
        for round in 0..<4 {
            let (device, model) = try Self.sharedPool()
            let (pool, _) = try reopen(device)
            let names = ["v", "s", "c"]
            let volumes = try names.map { try pool.openVolume(name: $0) }
            let mismatches = Mutex<[String]>([])
            DispatchQueue.concurrentPerform(iterations: 4) { thread in
                for k in 0..<names.count {
                    let which = (k + thread + round) % names.count
                    let piece = 64 << 10
                    for i in 0..<(Int(Self.volumeSize) / piece) {
                        let at = ((i * 7 + thread) % (Int(Self.volumeSize) / piece)) * piece
                        let expected = Array(model[names[which]]![at..<at + piece])
                        let got = try? volumes[which].read(at: UInt64(at), length: piece)
                        if got != expected { mismatches.withLock { $0.append("round \(round) thread \(thread): \(names[which]) at \(at)") } }
                    }
                }
            }
            #expect(mismatches.withLock { $0 } == [])
            #expect(pool.internalConsistencyProblems() == [], "round \(round)")
            #expect(pool.cacheEvents.sharedLeafCreations == 1, "round \(round): the root's place is one group")
        }
    }
}
