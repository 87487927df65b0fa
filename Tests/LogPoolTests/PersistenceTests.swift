import LogPool
import LogPoolTesting
import Testing

/// Builds a pool with every kind of object and returns it with the model of its contents.
func populate(_ pool: Pool) throws -> ReferenceModel {
    var model = ReferenceModel()
    let v = try pool.createVolume(name: "v", size: 40 * 4096)
    model.create("v", size: 40 * 4096)
    let data = pattern(30 * 4096 + 77, seed: 9)
    try v.write(at: 1000, from: data)
    model.write("v", at: 1000, data)
    try pool.snapshot(source: "v", name: "snap")
    model.branch("v", "snap", snapshot: true)
    try pool.clone(source: "snap", name: "clone")
    model.branch("snap", "clone", snapshot: false)
    let c = try pool.openVolume(name: "clone")
    try c.write(at: 9000, from: pattern(5000, seed: 10))
    model.write("clone", at: 9000, pattern(5000, seed: 10))
    try v.discard(at: 4096, length: 8192)
    model.discard("v", at: 4096, length: 8192)
    try pool.resize("clone", size: 80 * 4096)
    model.resize("clone", size: 80 * 4096)
    try pool.createVolume(name: "tmp", size: 4096)
    try pool.rename("tmp", to: "renamed")
    model.create("renamed", size: 4096)
    return model
}

/// Checks that `pool` holds exactly what `model` says.
func expectMatches(_ pool: Pool, _ model: ReferenceModel, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let rows = try pool.list()
    #expect(Set(rows.map(\.name)) == Set(model.volumes.keys), sourceLocation: sourceLocation)
    for row in rows {
        guard let entry = model.volumes[row.name] else { continue }
        #expect(row.sizeBytes == UInt64(entry.bytes.count), "size of \(row.name)", sourceLocation: sourceLocation)
        #expect((row.kind == "snapshot") == entry.isSnapshot, "kind of \(row.name)", sourceLocation: sourceLocation)
        let bytes = try pool.openVolume(name: row.name).read(at: 0, length: entry.bytes.count)
        #expect(bytes == entry.bytes, "contents of \(row.name)", sourceLocation: sourceLocation)
    }
}

@Suite("Persistence", .strictVerify)
struct PersistenceTests {
    @Test("everything survives close and open")
    func closeAndOpen() throws {
        let (pool, device) = try makePool()
        let model = try populate(pool)
        try pool.close()
        let (reopened, _) = try reopen(device)
        try expectMatches(reopened, model)
        #expect(reopened.stats.cleanlyClosed)
        let rows = Dictionary(uniqueKeysWithValues: try reopened.list().map { ($0.name, $0) })
        #expect(rows["clone"]?.origin == "snap")
        #expect(rows["snap"]?.origin == "v")
    }

    @Test("everything synced survives a crash that drops all unsynced writes")
    func crashAfterSync() throws {
        let (pool, device) = try makePool()
        let model = try populate(pool)
        try pool.sync()
        // Unsynced changes after the sync may vanish.
        try pool.openVolume(name: "v").write(at: 0, from: [1, 2, 3])
        let image = device.durable
        let (recovered, _) = try reopen(device, image: image)
        try expectMatches(recovered, model)
        #expect(!recovered.stats.cleanlyClosed)
        #expect(recovered.recoveryReport.replayedRecordCount > 0)
        #expect(recovered.recoveryReport.findings.isEmpty)
    }

    @Test("a recovered pool keeps working and survives a second crash")
    func secondCrash() throws {
        let (pool, device) = try makePool()
        var model = try populate(pool)
        try pool.sync()
        let (recovered, device2) = try reopen(device, image: device.durable)
        let v = try recovered.openVolume(name: "v")
        try v.write(at: 0, from: pattern(4096 * 3, seed: 11))
        model.write("v", at: 0, pattern(4096 * 3, seed: 11))
        try recovered.delete(name: "snap")
        model.delete("snap")
        try recovered.sync()
        let (again, _) = try reopen(device2, image: device2.durable)
        try expectMatches(again, model)
    }

    @Test("a checkpoint followed by a crash keeps everything")
    func checkpointThenCrash() throws {
        let (pool, device) = try makePool()
        let model = try populate(pool)
        try pool.checkpoint()
        let (recovered, _) = try reopen(device, image: device.durable)
        try expectMatches(recovered, model)
        #expect(recovered.recoveryReport.replayedRecordCount == 0)
    }

    @Test("read-only open recovers in memory and writes nothing")
    func readOnly() throws {
        let (pool, device) = try makePool()
        let model = try populate(pool)
        try pool.sync()
        let image = device.durable
        let copy = SimulatedDevice(image: image)
        let ro = try Pool.open(on: copy, mode: .readOnly)
        try expectMatches(ro, model)
        #expect(copy.writeCount == 0)
        expectPoolError({ if case .readOnly = $0 { true } else { false } }) { try ro.createVolume(name: "x", size: 4096) }
        expectPoolError({ if case .readOnly = $0 { true } else { false } }) { try ro.openVolume(name: "v").write(at: 0, from: [1]) }
        #expect(try ro.openVolume(name: "v").isReadOnly)
    }

    @Test("a real file: create, write, close, reopen; a second writer is refused")
    func realFile() throws {
        let path = "/tmp/logpool-test-\(UInt64.random(in: 0...UInt64.max)).pool"
        defer { unlinkFile(path) }
        let pool = try Pool.create(at: path, capacity: 16 << 20, compression: .lz4)
        let v = try pool.createVolume(name: "disk", size: 1 << 20)
        let text = Array(String(repeating: "LogPool keeps snapshots safe. ", count: 2000).utf8)
        try v.write(at: 4096, from: text)
        expectPoolError({ if case .inUse = $0 { true } else { false } }) { _ = try Pool.open(at: path) }
        expectPoolError({ if case .inUse = $0 { true } else { false } }) { _ = try Pool.open(at: path, mode: .readOnly) }
        expectPoolError({ if case .exists = $0 { true } else { false } }) { _ = try Pool.create(at: path, capacity: 16 << 20) }
        try pool.close()
        let ro1 = try Pool.open(at: path, mode: .readOnly)
        let ro2 = try Pool.open(at: path, mode: .readOnly)
        #expect(try ro2.openVolume(name: "disk").read(at: 4096, length: text.count) == text)
        // Compressible text is stored compressed.
        #expect(try ro1.openVolume(name: "disk").info().allocatedBytes < UInt64(text.count) / 2)
        try ro1.close()
        try ro2.close()
        expectPoolError({ $0 == .closed }) { _ = try ro1.list() }
    }
}

func unlinkFile(_ path: String) {
    _ = path.withCString { unlink($0) }
}

#if canImport(Glibc)
import Glibc
#endif
