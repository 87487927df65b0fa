import Foundation
import LogPool
import LogPoolTesting
import Testing

/// One random operation of a workload.
enum Op: CustomStringConvertible {
    case write(String, Int, [UInt8])
    case discard(String, Int, Int)
    case snapshot(String, String)
    case clone(String, String)
    case delete(String)
    case rename(String, String)
    case resize(String, Int)
    case sync
    case checkpoint

    var description: String {
        switch self {
        case .write(let v, let o, let d): "write(\(v), \(o), \(d.count))"
        case .discard(let v, let o, let n): "discard(\(v), \(o), \(n))"
        case .snapshot(let s, let n): "snapshot(\(s) -> \(n))"
        case .clone(let s, let n): "clone(\(s) -> \(n))"
        case .delete(let n): "delete(\(n))"
        case .rename(let a, let b): "rename(\(a) -> \(b))"
        case .resize(let v, let n): "resize(\(v), \(n))"
        case .sync: "sync"
        case .checkpoint: "checkpoint"
        }
    }
}

/// Draws random operations that are valid for `model` (so every op should succeed).
struct WorkloadGenerator {
    var generator: SeededGenerator
    var counter = 0
    let blockSize = 4096

    init(seed: UInt64) { generator = SeededGenerator(seed: seed) }

    mutating func next(_ model: ReferenceModel) -> Op {
        let writable = model.volumes.filter { !$0.value.isSnapshot }.keys.sorted()
        let all = model.volumes.keys.sorted()
        counter += 1
        let roll = Int.random(in: 0..<100, using: &generator)
        if let v = writable.randomElement(using: &generator), roll < 45 {
            let size = model.volumes[v]!.bytes.count
            let length = [1, 100, 4096, 5000, 3 * 4096, 64 * 1024].randomElement(using: &generator)!
            let clamped = min(length, size)
            let offset = Int.random(in: 0...(size - clamped), using: &generator)
            let aligned = Bool.random(using: &generator) ? offset / blockSize * blockSize : offset
            let data = (0..<clamped).map { _ in UInt8.random(in: 0...255, using: &generator) }
            return .write(v, min(aligned, size - clamped), data)
        }
        if let v = writable.randomElement(using: &generator), roll < 52 {
            let size = model.volumes[v]!.bytes.count
            let offset = Int.random(in: 0..<size, using: &generator)
            return .discard(v, offset, Int.random(in: 1...(size - offset), using: &generator))
        }
        if let s = all.randomElement(using: &generator), roll < 58, all.count < 6 {
            return Bool.random(using: &generator) ? .snapshot(s, "s\(counter)") : .clone(s, "c\(counter)")
        }
        if roll < 62, all.count > 2, let n = all.randomElement(using: &generator) {
            return .delete(n)
        }
        if roll < 65, let n = all.randomElement(using: &generator) {
            return .rename(n, "r\(counter)")
        }
        if roll < 70, let v = writable.randomElement(using: &generator) {
            return .resize(v, Int.random(in: 1...24, using: &generator) * blockSize)
        }
        if roll < 90 { return .sync }
        return .checkpoint
    }
}

func apply(_ op: Op, to pool: Pool, model: inout ReferenceModel) throws {
    switch op {
    case .write(let v, let o, let d):
        try pool.openVolume(name: v).write(at: UInt64(o), from: d)
        model.write(v, at: o, d)
    case .discard(let v, let o, let n):
        try pool.openVolume(name: v).discard(at: UInt64(o), length: UInt64(n))
        model.discard(v, at: o, length: n)
    case .snapshot(let s, let n):
        try pool.snapshot(source: s, name: n)
        model.branch(s, n, snapshot: true)
    case .clone(let s, let n):
        try pool.clone(source: s, name: n)
        model.branch(s, n, snapshot: false)
    case .delete(let n):
        try pool.delete(name: n)
        model.delete(n)
    case .rename(let a, let b):
        try pool.rename(a, to: b)
        model.rename(a, to: b)
    case .resize(let v, let n):
        try pool.resize(v, size: UInt64(n))
        model.resize(v, size: n)
    case .sync:
        try pool.sync()
    case .checkpoint:
        try pool.checkpoint()
    }
}

/// The logical content of a pool: name → (bytes, is snapshot).
func contents(of pool: Pool) throws -> [String: ReferenceModel.Entry] {
    var result: [String: ReferenceModel.Entry] = [:]
    for row in try pool.list() {
        let bytes = try pool.openVolume(name: row.name).read(at: 0, length: Int(row.sizeBytes))
        result[row.name] = ReferenceModel.Entry(bytes: bytes, isSnapshot: row.kind == "snapshot", origin: nil)
    }
    return result
}

func logical(_ model: ReferenceModel) -> [String: ReferenceModel.Entry] {
    model.volumes.mapValues { ReferenceModel.Entry(bytes: $0.bytes, isSnapshot: $0.isSnapshot, origin: nil) }
}

/// Crash-state enumeration (CRASH-TESTING.md §3.2, classes C0–C4): at every sync the
/// engine issues, before the pending writes become durable, build crash images and check
/// that each recovers (read-write, so recovery's own checkpoint runs too) to the model
/// after some op between the last durable one and the one in progress.
final class CrashEnumerator {
    var states: [[String: ReferenceModel.Entry]] = []
    /// Index into `states` of the last state made durable by a completed sync.
    var durableIndex = 0
    var checkedImages = 0
    var failures: [String] = []
    var generator: SeededGenerator
    let seed: UInt64
    var opLog: [String] = []
    var inOp = false
    /// When set, crash images also garble the partly covered physical sectors of every
    /// write that did not fully persist (a 4 KiB-sector device's read-modify-write).
    var physicalSectorByteCount: Int? = nil

    init(seed: UInt64) {
        self.seed = seed
        generator = SeededGenerator(seed: seed ^ 0xC0FFEE)
    }

    func images(of device: SimulatedDevice) -> [(String, [UInt8])] {
        let counts = device.pendingSectorCounts
        let n = counts.count
        var result: [(String, [UInt8])] = [("none", device.image(keeping: []))]
        for i in 1...max(n, 1) where n > 0 {
            result.append(("prefix \(i)", device.image(keeping: (0..<i).map { 0..<counts[$0] })))
        }
        for i in 0..<n where counts[i] > 1 {
            var left: [Range<Int>?] = (0..<i).map { 0..<counts[$0] }
            left.append(0..<1)
            result.append(("torn-left \(i)", device.image(keeping: left)))
            var right: [Range<Int>?] = (0..<i).map { 0..<counts[$0] }
            right.append((counts[i] - 1)..<counts[i])
            result.append(("torn-right \(i)", device.image(keeping: right)))
        }
        for i in 0..<n where n > 1 {
            result.append(("omit \(i)", device.image(keeping: (0..<n).map { $0 == i ? nil : 0..<counts[$0] })))
        }
        for k in 0..<3 where n > 1 {
            let kept: [Range<Int>?] = counts.map { c in
                switch Int.random(in: 0..<3, using: &generator) {
                case 0: return nil
                case 1: return 0..<c
                default: return 0..<Int.random(in: 0...c, using: &generator)
                }
            }
            result.append(("subset \(k)", device.image(keeping: kept)))
        }
        if let physical = physicalSectorByteCount {
            // Rebuild every image of this point with torn physical sectors garbled. Prefix i
            // keeps writes 0..<i whole and drops the rest; each dropped write may have torn.
            var garbled: [(String, [UInt8])] = []
            for i in 0...n {
                let kept: [Range<Int>?] = (0..<n).map { $0 < i ? 0..<counts[$0] : nil }
                garbled.append(("prefix \(i) @\(physical)", device.image(keeping: kept, physicalSectorByteCount: physical, using: &generator)))
            }
            for i in 0..<n where counts[i] > 1 {
                var left: [Range<Int>?] = (0..<i).map { 0..<counts[$0] }
                left.append(0..<1)
                garbled.append(("torn-left \(i) @\(physical)", device.image(keeping: left, physicalSectorByteCount: physical, using: &generator)))
            }
            return garbled
        }
        return result
    }

    func check(_ device: SimulatedDevice) {
        guard failures.count < 3 else { return }
        let candidates = Array(states[durableIndex...])
        for (label, image) in images(of: device) {
            checkedImages += 1
            let recoveredDevice = SimulatedDevice(image: image)
            do {
                // The checker on the crash image itself (read-only): a crash may tear a
                // superblock slot or the journal tail, which repair fixes; nothing it
                // finds may be unrepairable.
                let before = try Pool.verify(on: SimulatedDevice(image: image))
                let lasting = before.problems.filter { $0.severity == .error && !$0.repairable }
                if !lasting.isEmpty { failures.append("seed \(seed) \(label): verify before recovery: \(lasting.prefix(3))") }
                let pool = try Pool.open(on: recoveredDevice)
                let got = try contents(of: pool)
                if !candidates.contains(where: { $0 == got }) {
                    failures.append("seed \(seed) sync \(device.syncCount + 1) \(label): recovered state matches no prefix in \(durableIndex)...\(states.count - 1); ops: \(opLog.suffix(8))")
                }
                let problems = pool.internalConsistencyProblems()
                if !problems.isEmpty { failures.append("seed \(seed) \(label): invariants: \(problems.prefix(3))") }
                if !pool.recoveryReport.findings.isEmpty { failures.append("seed \(seed) \(label): findings \(pool.recoveryReport.findings.prefix(3))") }
                // After recovery's checkpoint the durable state scrubs clean, warnings included.
                let after = try Pool.verify(on: SimulatedDevice(image: recoveredDevice.currentImage), scrubData: true)
                if !after.problems.isEmpty { failures.append("seed \(seed) \(label): verify after recovery: \(after.problems.prefix(3))") }
                // Recovery is idempotent and the pool stays usable.
                let again = try Pool.open(on: SimulatedDevice(image: recoveredDevice.currentImage))
                if try contents(of: again) != got { failures.append("seed \(seed) \(label): second open differs") }
            } catch {
                failures.append("seed \(seed) sync \(device.syncCount + 1) \(label): open failed: \(error); ops: \(opLog.suffix(8))")
            }
        }
    }
}

@Suite("Crash consistency")
struct CrashTests {
    /// Goal: promises 1 and 2 under crashes at every sync the engine issues. Method: a
    /// seeded random workload on the 8 MiB test geometry; at each sync, every crash image
    /// of classes C0–C4 is recovered and compared with the model's states since the last
    /// durable one. The seed is in every failure message.
    @Test("every crash image recovers to a prefix that includes every synced op", arguments: [UInt64(1), 2, 3, 4])
    func enumerate(seed: UInt64) throws {
        try runEnumeration(seed: seed, physicalSectorByteCount: nil)
    }

    /// The same workloads on a device with 4 KiB physical sectors: a write that tears
    /// garbles the whole physical sectors it touches only partly. Catches anything
    /// written after a sync that shares a 4 KiB sector with what the sync made durable.
    @Test("crash images of a 4 KiB-sector device recover to a valid prefix", arguments: [UInt64(5), 6])
    func enumerate4K(seed: UInt64) throws {
        try runEnumeration(seed: seed, physicalSectorByteCount: 4096)
    }

    func runEnumeration(seed: UInt64, physicalSectorByteCount: Int?) throws {
        let device = SimulatedDevice(byteCount: 8 << 20)
        let pool = try Pool.create(on: device, capacity: 8 << 20, blockSize: 4096, segmentSize: 64 << 10,
                                   compression: seed % 2 == 0 ? .lz4 : .none)
        var model = ReferenceModel()
        try pool.createVolume(name: "a", size: 16 * 4096)
        model.create("a", size: 16 * 4096)
        try pool.createVolume(name: "b", size: 8 * 4096)
        model.create("b", size: 8 * 4096)
        try pool.sync()
        let enumerator = CrashEnumerator(seed: seed)
        enumerator.physicalSectorByteCount = physicalSectorByteCount
        enumerator.states = [logical(model)]
        device.beforeSync = { [unowned enumerator] dev in enumerator.check(dev) }
        var workload = WorkloadGenerator(seed: seed)
        let opCount = ProcessInfo.processInfo.environment["LOGPOOL_LONG"] == nil ? 60 : 600
        for _ in 0..<opCount {
            let op = workload.next(model)
            enumerator.opLog.append(op.description)
            let syncsBefore = device.syncCount
            try apply(op, to: pool, model: &model)
            // A sync inside this op made everything before it durable.
            if device.syncCount > syncsBefore {
                enumerator.durableIndex = enumerator.states.count - 1
            }
            enumerator.states.append(logical(model))
            if case .sync = op { enumerator.durableIndex = enumerator.states.count - 1 }
            if case .checkpoint = op { enumerator.durableIndex = enumerator.states.count - 1 }
        }
        device.beforeSync = nil
        print("crash enumeration seed \(seed) (sector \(physicalSectorByteCount ?? 512)): \(opCount) ops, \(device.syncCount) syncs, \(enumerator.checkedImages) crash images recovered, \(enumerator.failures.count) failures")
        #expect(enumerator.failures.isEmpty, "\(enumerator.failures.joined(separator: "\n"))")
        #expect(enumerator.checkedImages > 100, "only \(enumerator.checkedImages) crash images checked")
        #expect(pool.internalConsistencyProblems() == [])
    }
}

@Suite("Crash consistency near full")
struct CrashNearFullTests {
    /// Goal: crash safety where space reuse happens: holes (R-2), compaction and
    /// checkpoints forced by admission. Method: fill an 8 MiB pool to poolFull, then
    /// seeded overwrites, discards, snapshot deletes, syncs and compactions, enumerating
    /// crash images (C0-C4) at every sync the engine issues.
    @Test("crash images on a nearly full pool recover to a valid prefix", arguments: [(UInt64(31), 512), (33, 512), (34, 4096)])
    func nearFull(seed: UInt64, sector: Int) throws {
        let device = SimulatedDevice(byteCount: 8 << 20)
        let pool = try Pool.create(on: device, capacity: 8 << 20, blockSize: 4096, segmentSize: 64 << 10, compression: .none)
        var model = ReferenceModel()
        try pool.createVolume(name: "v", size: 7 << 20)
        model.create("v", size: 7 << 20)
        var written = 0
        do {
            while true {
                let data = pattern(32 * 1024, seed: UInt8(truncatingIfNeeded: written >> 15))
                try pool.openVolume(name: "v").write(at: UInt64(written), from: data)
                model.write("v", at: written, data)
                written += data.count
            }
        } catch PoolError.poolFull {}
        try pool.snapshot(source: "v", name: "s")
        model.branch("v", "s", snapshot: true)
        try pool.sync()
        let enumerator = CrashEnumerator(seed: seed)
        enumerator.physicalSectorByteCount = sector == 512 ? nil : sector
        enumerator.states = [logical(model)]
        device.beforeSync = { [unowned enumerator] dev in enumerator.check(dev) }
        var generator = SeededGenerator(seed: seed)
        let steps = ProcessInfo.processInfo.environment["LOGPOOL_LONG"] == nil ? 40 : 400
        for step in 0..<steps {
            let roll = Int.random(in: 0..<100, using: &generator)
            let syncsBefore = device.syncCount
            do {
                if roll < 70 {
                    let block = Int.random(in: 0..<(written / 4096), using: &generator)
                    let data = pattern(4096 * Int.random(in: 1...3, using: &generator), seed: UInt8(truncatingIfNeeded: step))
                    let offset = min(block * 4096, written - data.count)
                    enumerator.opLog.append("write \(offset) \(data.count)")
                    try pool.openVolume(name: "v").write(at: UInt64(offset), from: data)
                    model.write("v", at: offset, data)
                } else if roll < 78, model.volumes["s"] != nil {
                    enumerator.opLog.append("delete s")
                    try pool.delete(name: "s")
                    model.delete("s")
                } else if roll < 85 {
                    let offset = Int.random(in: 0..<(written / 4096), using: &generator) * 4096
                    enumerator.opLog.append("discard \(offset)")
                    try pool.openVolume(name: "v").discard(at: UInt64(offset), length: 8192)
                    model.discard("v", at: offset, length: 8192)
                } else if roll < 92 {
                    enumerator.opLog.append("sync")
                    try pool.sync()
                } else {
                    enumerator.opLog.append("compact")
                    _ = try pool.compact()
                }
            } catch PoolError.poolFull {
                // Allowed while the snapshot pins the old blocks; nothing changed.
                enumerator.opLog.append("poolFull")
            }
            if device.syncCount > syncsBefore { enumerator.durableIndex = enumerator.states.count - 1 }
            enumerator.states.append(logical(model))
            if roll >= 85 && roll < 92 { enumerator.durableIndex = enumerator.states.count - 1 }
            #expect(pool.internalConsistencyProblems() == [], "seed \(seed) step \(step)")
        }
        device.beforeSync = nil
         print("near-full crash enumeration seed \(seed) (sector \(sector)): \(steps) ops, \(enumerator.checkedImages) crash images, \(enumerator.failures.count) failures")
        #expect(enumerator.failures.isEmpty, "\(enumerator.failures.joined(separator: "\n"))")
        #expect(try contents(of: pool) == logical(model))
    }
}
