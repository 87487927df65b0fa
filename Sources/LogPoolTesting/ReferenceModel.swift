/// The oracle: volumes as plain byte arrays (CRASH-TESTING.md §3.5). Snapshots are frozen
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

    public mutating func write(_ name: String, at offset: Int, _ data: [UInt8]) {
        volumes[name]!.bytes.replaceSubrange(offset..<offset + data.count, with: data)
    }

    public mutating func discard(_ name: String, at offset: Int, length: Int) {
        volumes[name]!.bytes.replaceSubrange(offset..<offset + length, with: repeatElement(0, count: length))
    }

    public mutating func branch(_ source: String, _ name: String, snapshot: Bool) {
        volumes[name] = Entry(bytes: volumes[source]!.bytes, isSnapshot: snapshot, origin: source)
    }

    public mutating func delete(_ name: String) {
        volumes[name] = nil
        for key in volumes.keys where volumes[key]!.origin == name { volumes[key]!.origin = nil }
    }

    public mutating func rename(_ name: String, to newName: String) {
        volumes[newName] = volumes.removeValue(forKey: name)
        for key in volumes.keys where volumes[key]!.origin == name { volumes[key]!.origin = newName }
    }

    public mutating func resize(_ name: String, size: Int) {
        var bytes = volumes[name]!.bytes
        if size < bytes.count { bytes.removeLast(bytes.count - size) } else { bytes.append(contentsOf: repeatElement(0, count: size - bytes.count)) }
        volumes[name]!.bytes = bytes
    }
}
