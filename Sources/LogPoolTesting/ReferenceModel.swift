/// The oracle: volumes as plain byte arrays (Specs/CRASH-MODEL.md §5). Snapshots are frozen
/// copies; clones are copies that diverge.
public struct ReferenceModel: Equatable, Sendable {
    public struct Entry: Equatable, Sendable {
        public var bytes: [UInt8]
        public var isSnapshot: Bool
        public var origin: String?

        public init(bytes: [UInt8], isSnapshot: Bool, origin: String?) {
            self.bytes = bytes
            self.isSnapshot = isSnapshot
            self.origin = origin
        }
    }

    public var volumes: [String: Entry] = [:]

    public init() {}

    public mutating func create(_ name: String, size: Int) {
        volumes[name] = Entry(bytes: [UInt8](repeating: 0, count: size), isSnapshot: false, origin: nil)
    }

    /// The tests drive the model only with names it holds; anything else is a bug in
    /// the test, so it traps with the name.
    private func entry(_ name: String) -> Entry {
        guard let entry = volumes[name] else { preconditionFailure("reference model has no volume \(name)") }
        return entry
    }

    private mutating func update(_ name: String, _ change: (inout Entry) -> Void) {
        var value = entry(name)
        change(&value)
        volumes[name] = value
    }

    public mutating func write(_ name: String, at offset: Int, _ data: [UInt8]) {
        update(name) { $0.bytes.replaceSubrange(offset..<offset + data.count, with: data) }
    }

    public mutating func discard(_ name: String, at offset: Int, length: Int) {
        update(name) { $0.bytes.replaceSubrange(offset..<offset + length, with: repeatElement(0, count: length)) }
    }

    public mutating func branch(_ source: String, _ name: String, snapshot: Bool) {
        volumes[name] = Entry(bytes: entry(source).bytes, isSnapshot: snapshot, origin: source)
    }

    public mutating func delete(_ name: String) {
        volumes[name] = nil
        for (key, value) in volumes where value.origin == name { volumes[key]?.origin = nil }
    }

    public mutating func rename(_ name: String, to newName: String) {
        volumes[newName] = entry(name)
        volumes[name] = nil
        for (key, value) in volumes where value.origin == name { volumes[key]?.origin = newName }
    }

    public mutating func resize(_ name: String, size: Int) {
        update(name) { value in
            if size < value.bytes.count {
                value.bytes.removeLast(value.bytes.count - size)
            } else {
                value.bytes.append(contentsOf: repeatElement(0, count: size - value.bytes.count))
            }
        }
    }
}
