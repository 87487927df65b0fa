import LogPoolFormat

/// A volume or snapshot as the engine holds it in memory.
final class VolumeState {
    var record: VolumeRecord
    var map: Tree
    /// Set when the volume is deleted, so handles holding this object fail cleanly.
    var isDeleted = false

    init(record: VolumeRecord, map: Tree) {
        self.record = record
        self.map = map
    }
}

/// The map of a deleted volume or snapshot whose blocks are released in bounded steps
/// (the release queue: FORMAT C-11, COMMIT §5.4). Slots below `releasedSlotCount` are
/// released already.
final class QueuedMap {
    let id: UInt64
    var map: Tree
    var releasedSlotCount: UInt64

    init(id: UInt64, map: Tree, releasedSlotCount: UInt64) {
        self.id = id
        self.map = map
        self.releasedSlotCount = releasedSlotCount
    }
}

/// The volume catalog (Specs/ARCHITECTURE.md §2): every volume and snapshot by id and by
/// name, the next volume id, the bytes their rows take in the checkpoint root, and the
/// release queue (maps of deleted volumes whose blocks are still being released).
///
/// It owns these invariants, which its methods keep and ``problems()`` checks:
/// - `idsByName` and `byID` name the same volumes, each under its record's name;
/// - every id is below `nextID`, and ids only grow (a deleted volume's id is never reused,
///   so a journal record naming an id cannot meet another volume after a crash);
/// - `rowByteTotal` is the sum of the rows' sizes (FORMAT C-4), so admission can size the
///   next root in O(1) however many snapshots there are;
/// - a queued map's id is no live volume's.
///
/// What a change may do is decided here, and what it is checked against too, so
/// ``Engine/apply(_:recordByteOffset:)`` (the only caller that changes the catalog, for
/// live changes and replay alike) turns a ``Refusal`` into `corrupt(journal record)`.
/// Trees and page counts are not the catalog's: `apply` changes a map's pages.
struct VolumeCatalog {
    /// Why the catalog refused a change.
    enum Refusal: Error, Equatable, CustomStringConvertible {
        case idOutOfRange(UInt64)
        case idNotAboveLast(UInt64, nextID: UInt64)
        case nameExists(String)
        case noSuchVolume(UInt64)
        case noSuchQueuedMap(UInt64)
        case queuedTwice(UInt64)
        case duplicateID(UInt64)

        var description: String {
            switch self {
            case .idOutOfRange(let id): "volume id \(id) is out of range"
            case .idNotAboveLast(let id, let nextID): "volume id \(id) is not above the last id \(nextID - 1)"
            case .nameExists(let name): "volume name \"\(name)\" already exists"
            case .noSuchVolume(let id): "volume id \(id) does not exist"
            case .noSuchQueuedMap(let id): "queued map \(id) does not exist"
            case .queuedTwice(let id): "map \(id) is queued for release twice or belongs to a live volume"
            case .duplicateID(let id): "volume id \(id) is listed twice"
            }
        }
    }

    private(set) var byID: [UInt64: VolumeState] = [:]
    private(set) var idsByName: [String: UInt64] = [:]
    /// The id the next created volume gets (stored in the root: FORMAT C-4).
    private(set) var nextID: UInt64 = 1
    /// Bytes of the volume rows in the checkpoint root: the sum over `byID` of
    /// `CheckpointRoot.volumeRowByteCount(name:)`.
    private(set) var rowByteTotal = 0
    /// Maps of deleted volumes and snapshots, oldest first; each step releases part of
    /// the first one that can be read (COMMIT §5.4).
    private(set) var releaseQueue: [QueuedMap] = []

    init() {}

    /// The catalog a checkpoint root stores (at open): `volumes` and `queued` as they
    /// were, ids below `nextID`. A root that breaks an invariant is refused (the root's
    /// decoder checks the same rules, FORMAT C-4 and C-11, so this is a second line).
    init(nextID: UInt64, volumes: [VolumeState], queued: [QueuedMap]) throws(Refusal) {
        self.nextID = nextID
        for volume in volumes {
            let id = volume.record.id
            guard id > 0, id < nextID else { throw .idNotAboveLast(id, nextID: nextID) }
            guard byID[id] == nil else { throw .duplicateID(id) }
            try insert(volume)
        }
        for map in queued { try enqueue(map) }
    }

    var isEmpty: Bool { byID.isEmpty }

    subscript(id: UInt64) -> VolumeState? { byID[id] }

    func volume(named name: String) -> VolumeState? { idsByName[name].flatMap { byID[$0] } }

    /// Throws unless a volume with `id` and `name` may be added: the id is the next one
    /// or above it (replay sees the ids live changes used), the name is free.
    func checkNew(id: UInt64, name: String) throws(Refusal) {
        guard id < PoolGeometry.counterMax else { throw .idOutOfRange(id) }
        guard id >= nextID else { throw .idNotAboveLast(id, nextID: nextID) }
        guard idsByName[name] == nil else { throw .nameExists(name) }
    }

    /// Adds a created volume, snapshot or clone (checked by ``checkNew(id:name:)``).
    mutating func add(_ volume: VolumeState) throws(Refusal) {
        try checkNew(id: volume.record.id, name: volume.record.name)
        try insert(volume)
        nextID = volume.record.id + 1
    }

    private mutating func insert(_ volume: VolumeState) throws(Refusal) {
        guard idsByName[volume.record.name] == nil else { throw .nameExists(volume.record.name) }
        byID[volume.record.id] = volume
        idsByName[volume.record.name] = volume.record.id
        rowByteTotal += CheckpointRoot.volumeRowByteCount(name: volume.record.name)
    }

    /// Removes volume `id` (a delete) and marks its state deleted, so handles fail
    /// cleanly. A map with pages joins the release queue; its blocks stay referenced
    /// until the queue's steps release them.
    @discardableResult
    mutating func remove(id: UInt64) throws(Refusal) -> VolumeState {
        guard let volume = byID[id] else { throw .noSuchVolume(id) }
        if volume.map.root != nil {
            releaseQueue.append(QueuedMap(id: id, map: volume.map, releasedSlotCount: 0))
        }
        volume.isDeleted = true
        byID[id] = nil
        idsByName[volume.record.name] = nil
        rowByteTotal -= CheckpointRoot.volumeRowByteCount(name: volume.record.name)
        return volume
    }

    /// Renames volume `id` to the free name `name`.
    mutating func rename(id: UInt64, to name: String) throws(Refusal) {
        guard let volume = byID[id] else { throw .noSuchVolume(id) }
        guard idsByName[name] == nil else { throw .nameExists(name) }
        idsByName[volume.record.name] = nil
        rowByteTotal += CheckpointRoot.volumeRowByteCount(name: name) - CheckpointRoot.volumeRowByteCount(name: volume.record.name)
        volume.record.name = name
        idsByName[name] = id
    }

    // MARK: - Release queue

    private mutating func enqueue(_ map: QueuedMap) throws(Refusal) {
        guard map.id > 0, map.id < nextID else { throw .idNotAboveLast(map.id, nextID: nextID) }
        guard byID[map.id] == nil, !releaseQueue.contains(where: { $0.id == map.id }) else { throw .queuedTwice(map.id) }
        releaseQueue.append(map)
    }

    /// The queued map of deleted volume `id`.
    func queued(id: UInt64) throws(Refusal) -> QueuedMap {
        guard let map = releaseQueue.first(where: { $0.id == id }) else { throw .noSuchQueuedMap(id) }
        return map
    }

    /// Drops the queued map of `id` once its last step has released it.
    mutating func dequeue(id: UInt64) throws(Refusal) {
        guard let index = releaseQueue.firstIndex(where: { $0.id == id }) else { throw .noSuchQueuedMap(id) }
        releaseQueue.remove(at: index)
    }

    // MARK: - Checking

    /// One line per broken invariant (tests call it after every step); empty when sound.
    func problems() -> [String] {
        var problems: [String] = []
        let rows = byID.values.reduce(0) { $0 + CheckpointRoot.volumeRowByteCount(name: $1.record.name) }
        if rows != rowByteTotal { problems.append("volume row bytes \(rowByteTotal), but the rows take \(rows)") }
        if idsByName.count != byID.count { problems.append("\(idsByName.count) names for \(byID.count) volumes") }
        for (name, id) in idsByName where byID[id]?.record.name != name {
            problems.append("name \"\(name)\" names volume id \(id), whose record says \(byID[id].map { "\"\($0.record.name)\"" } ?? "nothing")")
        }
        for (id, volume) in byID {
            if volume.record.id != id { problems.append("volume id \(id) holds the record of id \(volume.record.id)") }
            if id == 0 || id >= nextID { problems.append("volume id \(id) is not below the next id \(nextID)") }
            if volume.isDeleted { problems.append("volume id \(id) is marked deleted but still listed") }
        }
        for map in releaseQueue {
            if byID[map.id] != nil { problems.append("queued map \(map.id) belongs to a live volume") }
            if map.id == 0 || map.id >= nextID { problems.append("queued map id \(map.id) is not below the next id \(nextID)") }
        }
        if Set(releaseQueue.map(\.id)).count != releaseQueue.count { problems.append("a map is queued twice") }
        return problems
    }
}
