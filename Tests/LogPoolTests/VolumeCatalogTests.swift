@testable import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// The volume catalog on its own (issue 11: components with tests of their own): names
/// and ids stay one-to-one, ids only grow, the root's row bytes stay the sum of the rows,
/// deletes queue their maps, and every refusal leaves the catalog as it was.
@Suite("Volume catalog")
struct VolumeCatalogTests {
    func volume(_ id: UInt64, _ name: String, root: Bool = false) -> VolumeState {
        let record = VolumeRecord(id: id, kind: .volume, name: name, sizeByteCount: 1 << 20, createdTime: 0,
                                  originID: 0, mapRoot: .none, mapHeight: 1)
        let map = Tree(kind: .map, root: root ? TreeNode(kind: .map, level: 0) : nil, height: 1)
        return VolumeState(record: record, map: map)
    }

    func rows(_ catalog: VolumeCatalog) -> Int {
        catalog.byID.values.reduce(0) { $0 + CheckpointRoot.volumeRowByteCount(name: $1.record.name) }
    }

    @Test("seeded adds, renames and removes keep names, ids and row bytes consistent")
    func seededChanges() throws {
        for seed in UInt64(1)...20 {
            var generator = SeededGenerator(seed: seed)
            var catalog = VolumeCatalog()
            var model: [UInt64: String] = [:]
            var nextID: UInt64 = 1
            for step in 0..<300 {
                let name = "v\(Int.random(in: 0..<40, using: &generator))" + String(repeating: "x", count: Int.random(in: 0..<20, using: &generator))
                switch Int.random(in: 0..<3, using: &generator) {
                case 0:
                    let id = nextID + UInt64.random(in: 0..<3, using: &generator)
                    if model.values.contains(name) {
                        #expect(throws: VolumeCatalog.Refusal.nameExists(name)) { try catalog.add(volume(id, name)) }
                    } else {
                        try catalog.add(volume(id, name))
                        model[id] = name
                        nextID = id + 1
                    }
                case 1:
                    guard let id = model.keys.randomElement(using: &generator) else { continue }
                    if model.values.contains(name) {
                        #expect(throws: VolumeCatalog.Refusal.nameExists(name)) { try catalog.rename(id: id, to: name) }
                    } else {
                        try catalog.rename(id: id, to: name)
                        model[id] = name
                    }
                default:
                    let id = model.keys.randomElement(using: &generator) ?? nextID
                    if model[id] == nil {
                        #expect(throws: VolumeCatalog.Refusal.noSuchVolume(id)) { try catalog.remove(id: id) }
                    } else {
                        let removed = try catalog.remove(id: id)
                        #expect(removed.isDeleted)
                        model[id] = nil
                    }
                }
                #expect(catalog.problems().isEmpty, "seed \(seed) step \(step): \(catalog.problems())")
                #expect(catalog.rowByteTotal == rows(catalog), "seed \(seed) step \(step)")
                #expect(catalog.nextID == nextID, "seed \(seed) step \(step)")
                #expect(Dictionary(uniqueKeysWithValues: catalog.byID.map { ($0.key, $0.value.record.name) }) == model, "seed \(seed) step \(step)")
                for (id, name) in model { #expect(catalog.volume(named: name)?.record.id == id, "seed \(seed) step \(step)") }
            }
        }
    }

    @Test("ids only grow: an id at or below the last one, or out of range, is refused")
    func idsOnlyGrow() throws {
        var catalog = VolumeCatalog()
        try catalog.add(volume(5, "a"))
        #expect(throws: VolumeCatalog.Refusal.idNotAboveLast(5, nextID: 6)) { try catalog.add(volume(5, "b")) }
        #expect(throws: VolumeCatalog.Refusal.idNotAboveLast(3, nextID: 6)) { try catalog.add(volume(3, "b")) }
        try catalog.remove(id: 5)
        // A deleted volume's id is not reused.
        #expect(throws: VolumeCatalog.Refusal.idNotAboveLast(5, nextID: 6)) { try catalog.add(volume(5, "a")) }
        #expect(throws: VolumeCatalog.Refusal.idOutOfRange(PoolGeometry.counterMax)) {
            try catalog.add(volume(PoolGeometry.counterMax, "c"))
        }
        #expect(catalog.isEmpty && catalog.nextID == 6 && catalog.rowByteTotal == 0)
    }

    @Test("a delete queues a map with pages, and only the last step dequeues it")
    func deletesQueueTheirMaps() throws {
        var catalog = VolumeCatalog()
        try catalog.add(volume(1, "empty"))
        try catalog.add(volume(2, "full", root: true))
        try catalog.remove(id: 1)
        #expect(catalog.releaseQueue.isEmpty, "an empty map has nothing to release")
        try catalog.remove(id: 2)
        #expect(catalog.releaseQueue.map(\.id) == [2])
        #expect(try catalog.queued(id: 2).releasedSlotCount == 0)
        #expect(throws: VolumeCatalog.Refusal.noSuchQueuedMap(1)) { try catalog.queued(id: 1) }
        try catalog.dequeue(id: 2)
        #expect(catalog.releaseQueue.isEmpty)
        #expect(throws: VolumeCatalog.Refusal.noSuchQueuedMap(2)) { try catalog.dequeue(id: 2) }
        #expect(catalog.problems().isEmpty)
    }

    @Test("a stored catalog is refused when an id repeats, is not below the next id, or a queued map is a live volume")
    func storedCatalogChecked() throws {
        let loaded = try VolumeCatalog(nextID: 4, volumes: [volume(1, "a"), volume(3, "b")],
                                       queued: [QueuedMap(id: 2, map: Tree(kind: .map, root: nil, height: 1), releasedSlotCount: 0)])
        #expect(loaded.problems().isEmpty && loaded.nextID == 4 && loaded.rowByteTotal == rows(loaded))
        #expect(throws: VolumeCatalog.Refusal.duplicateID(1)) {
            try VolumeCatalog(nextID: 4, volumes: [volume(1, "a"), volume(1, "b")], queued: [])
        }
        #expect(throws: VolumeCatalog.Refusal.idNotAboveLast(4, nextID: 4)) {
            try VolumeCatalog(nextID: 4, volumes: [volume(4, "a")], queued: [])
        }
        #expect(throws: VolumeCatalog.Refusal.nameExists("a")) {
            try VolumeCatalog(nextID: 4, volumes: [volume(1, "a"), volume(2, "a")], queued: [])
        }
        #expect(throws: VolumeCatalog.Refusal.idNotAboveLast(4, nextID: 4)) {
            try VolumeCatalog(nextID: 4, volumes: [],
                              queued: [QueuedMap(id: 4, map: Tree(kind: .map, root: nil, height: 1), releasedSlotCount: 0)])
        }
        #expect(throws: VolumeCatalog.Refusal.queuedTwice(1)) {
            try VolumeCatalog(nextID: 4, volumes: [volume(1, "a")],
                              queued: [QueuedMap(id: 1, map: Tree(kind: .map, root: nil, height: 1), releasedSlotCount: 0)])
        }
    }

    @Test("a replayed record the catalog refuses is corrupt(journal record), and changes nothing")
    func refusalsAreRecordDamage() throws {
        let (pool, _) = try makePool()
        try pool.createVolume(name: "a", size: 1 << 20)
        try pool.createVolume(name: "b", size: 1 << 20)
        try pool.openVolume(name: "a").write(at: 0, from: [1])
        let engine = pool.engine
        let before = engine.catalog.byID.mapValues(\.record.name)
        let sourceParents = try #require(engine.catalog.volume(named: "a")?.map.root).parentCount
        for intent in [JournalIntent.createVolume(id: 1, name: "c", sizeByteCount: 4096, createdTime: 0),
                       .branch(id: 9, sourceID: 1, kind: .snapshot, name: "b", createdTime: 0),
                       .branch(id: 1, sourceID: 1, kind: .snapshot, name: "s", createdTime: 0),
                       .branch(id: 9, sourceID: 7, kind: .volume, name: "s", createdTime: 0),
                       .createVolume(id: 9, name: "a", sizeByteCount: 4096, createdTime: 0),
                       .rename(id: 1, name: "b"), .rename(id: 7, name: "z"), .delete(id: 7),
                       .releaseQueued(id: 1, upTo: 1)] {
            do {
                try engine.apply(intent, recordByteOffset: 4096)
                Issue.record("\(intent) was applied")
            } catch PoolError.corrupt(let structure, let offset, _) {
                #expect(structure == "journal record" && offset == 4096)
            }
            #expect(engine.catalog.byID.mapValues(\.record.name) == before && engine.catalog.problems().isEmpty, "\(intent)")
            #expect(engine.catalog.volume(named: "a")?.map.root?.parentCount == sourceParents, "\(intent)")
        }
    }
}
