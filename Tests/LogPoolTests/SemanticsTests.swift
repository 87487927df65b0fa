import LogPool
import LogPoolTesting
import Testing

@Suite("Volume semantics", .strictVerify)
struct SemanticsTests {
    @Test("unwritten ranges read as zeros")
    func sparseZeros() throws {
        let (pool, _) = try makePool()
        let volume = try pool.createVolume(name: "v", size: 1 << 20)
        #expect(try volume.read(at: 0, length: 1 << 20).allSatisfy { $0 == 0 })
        #expect(try volume.read(at: 12345, length: 777).allSatisfy { $0 == 0 })
        #expect(try volume.info().allocatedBytes == 0)
    }

    @Test("unaligned writes across block boundaries read back exactly")
    func unaligned() throws {
        let (pool, _) = try makePool()
        let volume = try pool.createVolume(name: "v", size: 64 * 4096)
        var model = [UInt8](repeating: 0, count: 64 * 4096)
        let writes: [(Int, Int)] = [(100, 5000), (4095, 2), (8191, 8194), (0, 1), (64 * 4096 - 3, 3), (30000, 40000)]
        for (i, (offset, length)) in writes.enumerated() {
            let data = pattern(length, seed: UInt8(i + 1))
            try volume.write(at: UInt64(offset), from: data)
            model.replaceSubrange(offset..<offset + length, with: data)
            #expect(try volume.read(at: 0, length: model.count) == model)
        }
        #expect(try volume.read(at: 4000, length: 300) == Array(model[4000..<4300]))
    }

    @Test("a snapshot keeps the bytes of the moment it was taken")
    func snapshotIsolation() throws {
        let (pool, _) = try makePool()
        let volume = try pool.createVolume(name: "v", size: 256 * 1024)
        let before = pattern(256 * 1024, seed: 1)
        try volume.write(at: 0, from: before)
        let snap = try pool.snapshot(source: "v", name: "s")
        try volume.write(at: 5000, from: pattern(70000, seed: 2))
        #expect(try snap.read(at: 0, length: before.count) == before)
        #expect(try volume.read(at: 5000, length: 70000) == pattern(70000, seed: 2))
        #expect(snap.isReadOnly)
        expectPoolError({ if case .readOnly = $0 { true } else { false } }) {
            try snap.write(at: 0, from: [1])
        }
        expectPoolError({ if case .readOnly = $0 { true } else { false } }) {
            try snap.discard(at: 0, length: 4096)
        }
    }

    @Test("clones diverge both ways and snapshots of clones work")
    func cloneDivergence() throws {
        let (pool, _) = try makePool()
        let a = try pool.createVolume(name: "a", size: 128 * 1024)
        try a.write(at: 0, from: pattern(128 * 1024, seed: 3))
        let b = try pool.clone(source: "a", name: "b")
        try a.write(at: 0, from: [UInt8](repeating: 0xAA, count: 4096))
        try b.write(at: 4096, from: [UInt8](repeating: 0xBB, count: 4096))
        var expectA = pattern(128 * 1024, seed: 3), expectB = expectA
        expectA.replaceSubrange(0..<4096, with: repeatElement(0xAA, count: 4096))
        expectB.replaceSubrange(4096..<8192, with: repeatElement(0xBB, count: 4096))
        #expect(try a.read(at: 0, length: expectA.count) == expectA)
        #expect(try b.read(at: 0, length: expectB.count) == expectB)
        let sb = try pool.snapshot(source: "b", name: "sb")
        try b.write(at: 0, from: [UInt8](repeating: 0xCC, count: 100))
        #expect(try sb.read(at: 0, length: expectB.count) == expectB)
        let c = try pool.clone(source: "sb", name: "c")
        #expect(try c.read(at: 0, length: expectB.count) == expectB)
        #expect(!c.isReadOnly)
        let rows = Dictionary(uniqueKeysWithValues: try pool.list().map { ($0.name, $0) })
        #expect(rows["b"]?.origin == "a")
        #expect(rows["sb"]?.kind == "snapshot")
        #expect(rows["c"]?.origin == "sb")
    }

    @Test("space accounting: allocated, exclusive and shared are exact")
    func accounting() throws {
        let (pool, _) = try makePool()
        let v = try pool.createVolume(name: "v", size: 64 * 4096)
        try v.write(at: 0, from: pattern(10 * 4096, seed: 4))
        var info = try v.info()
        #expect(info.allocatedBytes == 10 * 4096)
        #expect(info.exclusiveBytes == 10 * 4096)
        try pool.snapshot(source: "v", name: "s")
        info = try v.info()
        #expect(info.allocatedBytes == 10 * 4096)
        #expect(info.exclusiveBytes == 0)
        try v.write(at: 0, from: pattern(3 * 4096, seed: 5))
        info = try v.info()
        #expect(info.allocatedBytes == 10 * 4096)
        #expect(info.exclusiveBytes == 3 * 4096)
        let s = try pool.openVolume(name: "s").info()
        #expect(s.allocatedBytes == 10 * 4096)
        #expect(s.exclusiveBytes == 3 * 4096)
        try v.discard(at: 0, length: 4096)
        #expect(try v.info().exclusiveBytes == 2 * 4096)
        #expect(try v.info().allocatedBytes == 9 * 4096)
        // Deleting the snapshot hands its exclusive blocks back; v owns all it maps.
        try pool.delete(name: "s")
        info = try v.info()
        #expect(info.exclusiveBytes == 9 * 4096)
        #expect(info.allocatedBytes == 9 * 4096)
    }

    @Test("delete of a snapshot whose blocks are shared keeps the source intact")
    func deleteShared() throws {
        let (pool, _) = try makePool()
        let v = try pool.createVolume(name: "v", size: 32 * 4096)
        let data = pattern(32 * 4096, seed: 6)
        try v.write(at: 0, from: data)
        try pool.snapshot(source: "v", name: "s1")
        try pool.snapshot(source: "s1", name: "s2")
        try pool.delete(name: "s1")
        #expect(try v.read(at: 0, length: data.count) == data)
        #expect(try pool.openVolume(name: "s2").read(at: 0, length: data.count) == data)
        try pool.delete(name: "v")
        #expect(try pool.openVolume(name: "s2").read(at: 0, length: data.count) == data)
        expectPoolError({ $0 == .notFound("v") }) { _ = try pool.openVolume(name: "v") }
    }

    @Test("resize grows with zeros and shrink releases blocks")
    func resize() throws {
        let (pool, _) = try makePool()
        let v = try pool.createVolume(name: "v", size: 16 * 4096)
        try v.write(at: 0, from: pattern(16 * 4096, seed: 7))
        // Shrinking drops data, so it must be asked for; the refusal names what it drops.
        expectPoolError({ if case .invalidArgument(let m) = $0 { m.contains("32768 mapped bytes") } else { false } }) {
            try pool.resize("v", size: 8 * 4096)
        }
        #expect(v.size == 16 * 4096)
        #expect(try pool.resize("v", size: 8 * 4096, allowShrink: true) == 8 * 4096)
        #expect(v.size == 8 * 4096)
        #expect(try v.info().allocatedBytes == 8 * 4096)
        expectPoolError({ if case .outOfRange = $0 { true } else { false } }) { _ = try v.read(at: 8 * 4096, length: 1) }
        try pool.resize("v", size: 4000 * 4096)
        #expect(try v.read(at: 0, length: 8 * 4096) == Array(pattern(16 * 4096, seed: 7)[0..<(8 * 4096)]))
        #expect(try v.read(at: 8 * 4096, length: 8 * 4096).allSatisfy { $0 == 0 })
        try v.write(at: 3999 * 4096, from: [9, 9, 9])
        #expect(try v.read(at: 3999 * 4096, length: 3) == [9, 9, 9])
        try pool.snapshot(source: "v", name: "s")
        expectPoolError({ if case .readOnly = $0 { true } else { false } }) { try pool.resize("s", size: 4096) }
        expectPoolError({ if case .invalidArgument = $0 { true } else { false } }) { try pool.resize("v", size: 100) }
    }

    @Test("discard reads back zeros, partial edges included")
    func discard() throws {
        let (pool, _) = try makePool()
        let v = try pool.createVolume(name: "v", size: 16 * 4096)
        var model = pattern(16 * 4096, seed: 8)
        try v.write(at: 0, from: model)
        try v.discard(at: 1000, length: 3 * 4096)
        model.replaceSubrange(1000..<(1000 + 3 * 4096), with: repeatElement(0, count: 3 * 4096))
        #expect(try v.read(at: 0, length: model.count) == model)
        try v.discard(at: 10 * 4096 + 5, length: 10)
        model.replaceSubrange((10 * 4096 + 5)..<(10 * 4096 + 15), with: repeatElement(0, count: 10))
        #expect(try v.read(at: 0, length: model.count) == model)
        #expect(try v.info().allocatedBytes == 14 * 4096)
    }

    @Test("rename, duplicate names and invalid names")
    func names() throws {
        let (pool, _) = try makePool()
        try pool.createVolume(name: "a", size: 4096)
        try pool.createVolume(name: "b", size: 4096)
        expectPoolError({ $0 == .exists("a") }) { try pool.createVolume(name: "a", size: 4096) }
        expectPoolError({ $0 == .exists("b") }) { try pool.rename("a", to: "b") }
        expectPoolError({ $0 == .exists("b") }) { try pool.snapshot(source: "a", name: "b") }
        try pool.rename("a", to: "c")
        #expect(try pool.list().map(\.name) == ["b", "c"])
        for bad in ["", String(repeating: "x", count: 256), "tab\there", "nl\n", "a/b", "\u{7F}"] {
            expectPoolError({ if case .invalidArgument = $0 { true } else { false } }, "name \(bad.debugDescription)") {
                try pool.createVolume(name: bad, size: 4096)
            }
        }
        try pool.createVolume(name: String(repeating: "é", count: 127), size: 4096)
        expectPoolError({ $0 == .notFound("zz") }) { try pool.delete(name: "zz") }
    }

    @Test("out-of-range I/O is refused")
    func outOfRange() throws {
        let (pool, _) = try makePool()
        let v = try pool.createVolume(name: "v", size: 8192)
        expectPoolError({ if case .outOfRange = $0 { true } else { false } }) { try v.write(at: 8190, from: [1, 2, 3]) }
        expectPoolError({ if case .outOfRange = $0 { true } else { false } }) { _ = try v.read(at: UInt64.max - 1, length: 4) }
        expectPoolError({ if case .outOfRange = $0 { true } else { false } }) { try v.discard(at: 4096, length: 8192) }
        #expect(try v.read(at: 0, length: 8192).allSatisfy { $0 == 0 })
    }
}
