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
        }
    }
}

/// Draws random operations that are valid for `model` (so every op should succeed).
public struct WorkloadGenerator: Sendable {
    var generator: SeededGenerator
    var counter = 0
    let blockSize = 4096

    public init(seed: UInt64) { generator = SeededGenerator(seed: seed) }

    /// A name no volume of `model` has (a workload continuing on a pool that earlier
    /// workloads named, as in `logpool torture`, must not collide).
    private func fresh(_ prefix: String, _ model: ReferenceModel) -> String {
        var name = "\(prefix)\(counter)"
        while model.volumes[name] != nil { name += "x" }
        return name
    }

    public mutating func next(_ model: ReferenceModel) -> Op {
        let writable = model.volumes.filter { !$0.value.isSnapshot }.sorted { $0.key < $1.key }
        let all = model.volumes.keys.sorted()
        counter += 1
        let roll = Int.random(in: 0..<100, using: &generator)
        if let (v, entry) = writable.randomElement(using: &generator), roll < 45 {
            let size = entry.bytes.count
            let length = [1, 100, 4096, 5000, 3 * 4096, 64 * 1024].randomElement(using: &generator)!
            let clamped = min(length, size)
            let offset = Int.random(in: 0...(size - clamped), using: &generator)
            let aligned = Bool.random(using: &generator) ? offset / blockSize * blockSize : offset
            let data = (0..<clamped).map { _ in UInt8.random(in: 0...255, using: &generator) }
            return .write(v, min(aligned, size - clamped), data)
        }
        if let (v, entry) = writable.randomElement(using: &generator), roll < 52 {
            let size = entry.bytes.count
            let offset = Int.random(in: 0..<size, using: &generator)
            return .discard(v, offset, Int.random(in: 1...(size - offset), using: &generator))
        }
        if let s = all.randomElement(using: &generator), roll < 58, all.count < 6 {
            return Bool.random(using: &generator) ? .snapshot(s, fresh("s", model)) : .clone(s, fresh("c", model))
        }
        if roll < 62, all.count > 2, let n = all.randomElement(using: &generator) {
            return .delete(n)
        }
        if roll < 65, let n = all.randomElement(using: &generator) {
            return .rename(n, fresh("r", model))
        }
        if roll < 70, let (v, _) = writable.randomElement(using: &generator) {
            return .resize(v, Int.random(in: 1...24, using: &generator) * blockSize)
        }
        if roll < 90 { return .sync }
        return .checkpoint
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
    case .sync, .checkpoint: break
    }
}

/// A model holding exactly `contents` (what ``contents(of:)`` read from a pool).
public func model(of contents: [String: ReferenceModel.Entry]) -> ReferenceModel {
    var model = ReferenceModel()
    model.volumes = contents
    return model
}

/// Runs `op` on the pool and, when it succeeds, on the model.
public func apply(_ op: Op, to pool: Pool, model: inout ReferenceModel) throws {
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

