import LogPool

/// One random operation of a workload.
public enum Op: CustomStringConvertible, Sendable {
    case write(String, Int, [UInt8])
    case discard(String, Int, Int)
    case snapshot(String, String)
    case clone(String, String)
    case delete(String)
    case rename(String, String)
    case resize(String, Int)
    case sync
    case checkpoint
    case compact
    /// Close the pool (a clean close) and open it again read-write.
    case reopen

    /// Ops whose success means everything before them is durable.
    public var isDurabilityPoint: Bool {
        switch self {
        case .sync, .checkpoint, .compact, .reopen: true
        default: false
        }
    }

    public var description: String {
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
        case .compact: "compact"
        case .reopen: "reopen"
        }
    }
}

/// Relative weights of the kinds of op a workload draws.
public struct OpWeights: Sendable, CustomStringConvertible {
    public var write = 45, discard = 7, branch = 6, delete = 4, rename = 3, resize = 5, sync = 20, checkpoint = 8, compact = 2, reopen = 0

    public init() {}

    /// Weights drawn from the seed (swarm testing: each workload stresses a different
    /// mix, as VOPR draws its fault probabilities). Writes and syncs never drop to zero.
    public static func swarm(seed: UInt64) -> OpWeights {
        var generator = SeededGenerator(seed: seed ^ 0x5_7A2B)
        func draw(_ choices: [Int]) -> Int { choices[Int.random(in: 0..<choices.count, using: &generator)] }
        var weights = OpWeights()
        weights.write = draw([10, 20, 40, 80])
        weights.discard = draw([0, 2, 5, 10, 20])
        weights.branch = draw([0, 2, 5, 10])
        weights.delete = draw([0, 2, 5, 10])
        weights.rename = draw([0, 2, 5])
        weights.resize = draw([0, 2, 5, 10])
        weights.sync = draw([5, 10, 20, 40])
        weights.checkpoint = draw([0, 2, 5, 10])
        weights.compact = draw([0, 1, 3])
        weights.reopen = draw([0, 0, 1, 3])
        return weights
    }

    public var description: String {
        "write \(write) discard \(discard) branch \(branch) delete \(delete) rename \(rename) resize \(resize) sync \(sync) checkpoint \(checkpoint) compact \(compact) reopen \(reopen)"
    }
}

/// Draws random operations that are valid for `model` (so every op should succeed).
public struct WorkloadGenerator: Sendable {
    var generator: SeededGenerator
    var counter = 0
    let blockSize = 4096
    public let weights: OpWeights

    public init(seed: UInt64, weights: OpWeights = OpWeights()) {
        generator = SeededGenerator(seed: seed)
        self.weights = weights
    }

    /// A name no volume of `model` has (a workload continuing on a pool that earlier
    /// workloads named, as in `logpool-sim torture`, must not collide).
    private func fresh(_ prefix: String, _ model: ReferenceModel) -> String {
        var name = "\(prefix)\(counter)"
        while model.volumes[name] != nil { name += "x" }
        return name
    }

    public mutating func next(_ model: ReferenceModel) -> Op {
        let writable = model.volumes.filter { !$0.value.isSnapshot }.sorted { $0.key < $1.key }
        let all = model.volumes.keys.sorted()
        counter += 1
        let w = weights
        let kinds: [(Int, Int)] = [(0, w.write), (1, w.discard), (2, w.branch), (3, w.delete), (4, w.rename),
                                   (5, w.resize), (6, w.sync), (7, w.checkpoint), (8, w.compact), (9, w.reopen)]
        var roll = Int.random(in: 0..<max(1, kinds.reduce(0) { $0 + $1.1 }), using: &generator)
        var kind = 6
        for (k, weight) in kinds {
            if roll < weight { kind = k; break }
            roll -= weight
        }
        switch kind {
        case 0:
            guard let (v, entry) = writable.randomElement(using: &generator) else { return .sync }
            let size = entry.bytes.count
            let length = [1, 100, 4096, 5000, 3 * 4096, 64 * 1024].randomElement(using: &generator)!
            let clamped = min(length, size)
            let offset = Int.random(in: 0...(size - clamped), using: &generator)
            let aligned = Bool.random(using: &generator) ? offset / blockSize * blockSize : offset
            let data = (0..<clamped).map { _ in UInt8.random(in: 0...255, using: &generator) }
            return .write(v, min(aligned, size - clamped), data)
        case 1:
            guard let (v, entry) = writable.randomElement(using: &generator) else { return .sync }
            let size = entry.bytes.count
            let offset = Int.random(in: 0..<size, using: &generator)
            return .discard(v, offset, Int.random(in: 1...(size - offset), using: &generator))
        case 2:
            guard all.count < 6, let s = all.randomElement(using: &generator) else { return .sync }
            return Bool.random(using: &generator) ? .snapshot(s, fresh("s", model)) : .clone(s, fresh("c", model))
        case 3:
            guard all.count > 2, let n = all.randomElement(using: &generator) else { return .sync }
            return .delete(n)
        case 4:
            guard let n = all.randomElement(using: &generator) else { return .sync }
            return .rename(n, fresh("r", model))
        case 5:
            guard let (v, _) = writable.randomElement(using: &generator) else { return .sync }
            return .resize(v, Int.random(in: 1...24, using: &generator) * blockSize)
        case 7: return .checkpoint
        case 8: return .compact
        case 9: return .reopen
        default: return .sync
        }
    }
}

/// Applies `op` to the model alone (what the pool should then hold).
public func apply(_ op: Op, to model: inout ReferenceModel) {
    switch op {
    case .write(let v, let o, let d): model.write(v, at: o, d)
    case .discard(let v, let o, let n): model.discard(v, at: o, length: n)
    case .snapshot(let s, let n): model.branch(s, n, snapshot: true)
    case .clone(let s, let n): model.branch(s, n, snapshot: false)
    case .delete(let n): model.delete(n)
    case .rename(let a, let b): model.rename(a, to: b)
    case .resize(let v, let n): model.resize(v, size: n)
    case .sync, .checkpoint, .compact, .reopen: break
    }
}

/// Whether `op` makes sense for `model` (names exist or are free, ranges inside the
/// volume, no write to a snapshot): the ops a shrunk workload keeps may not.
public func isApplicable(_ op: Op, to model: ReferenceModel) -> Bool {
    func writable(_ name: String) -> ReferenceModel.Entry? {
        guard let entry = model.volumes[name], !entry.isSnapshot else { return nil }
        return entry
    }
    switch op {
    case .write(let v, let o, let d): return writable(v).map { o >= 0 && o + d.count <= $0.bytes.count } ?? false
    case .discard(let v, let o, let n): return writable(v).map { o >= 0 && n > 0 && o + n <= $0.bytes.count } ?? false
    case .snapshot(let s, let n), .clone(let s, let n): return model.volumes[s] != nil && model.volumes[n] == nil
    case .delete(let n): return model.volumes[n] != nil
    case .rename(let a, let b): return model.volumes[a] != nil && model.volumes[b] == nil
    case .resize(let v, let n): return writable(v) != nil && n > 0
    case .sync, .checkpoint, .compact, .reopen: return true
    }
}

/// A model holding exactly `contents` (what ``contents(of:)`` read from a pool).
public func model(of contents: [String: ReferenceModel.Entry]) -> ReferenceModel {
    var model = ReferenceModel()
    model.volumes = contents
    return model
}

/// Runs `op` on the pool and, when it succeeds, on the model. `reopen` opens the pool
/// again after `.reopen` closed it (the caller knows its device or path); without it
/// `.reopen` is refused.
public func apply(_ op: Op, to pool: inout Pool, model: inout ReferenceModel, reopen: (() throws -> Pool)? = nil) throws {
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
        try pool.resize(v, size: UInt64(n), allowShrink: true)
        model.resize(v, size: n)
    case .sync:
        try pool.sync()
    case .checkpoint:
        try pool.checkpoint()
    case .compact:
        _ = try pool.compact()
    case .reopen:
        guard let reopen else { throw PoolError.invalidArgument("reopen: this workload cannot open its pool again") }
        try pool.close()
        pool = try reopen()
    }
}

/// The logical content of a pool: name → (bytes, is snapshot).
public func contents(of pool: Pool) throws -> [String: ReferenceModel.Entry] {
    var result: [String: ReferenceModel.Entry] = [:]
    for row in try pool.list() {
        let bytes = try pool.openVolume(name: row.name).read(at: 0, length: Int(row.sizeBytes))
        result[row.name] = ReferenceModel.Entry(bytes: bytes, isSnapshot: row.kind == "snapshot", origin: nil)
    }
    return result
}

/// The model's logical content in the shape ``contents(of:)`` returns.
public func logical(_ model: ReferenceModel) -> [String: ReferenceModel.Entry] {
    model.volumes.mapValues { ReferenceModel.Entry(bytes: $0.bytes, isSnapshot: $0.isSnapshot, origin: nil) }
}

