import ArgumentParser
import Foundation
import LogPool

/// A byte count on the command line: plain bytes or a K/M/G/T suffix (powers of 1024).
struct ByteSize: ExpressibleByArgument, Sendable {
    var bytes: UInt64

    init?(argument: String) {
        guard let value = ByteSize.parse(argument) else { return nil }
        bytes = value
    }

    static func parse(_ text: String) -> UInt64? {
        guard let last = text.last else { return nil }
        let shifts: [Character: UInt64] = ["K": 10, "M": 20, "G": 30, "T": 40, "k": 10, "m": 20, "g": 30, "t": 40]
        var digits = Substring(text)
        var shift: UInt64 = 0
        if let s = shifts[last] {
            shift = s
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let number = UInt64(digits) else { return nil }
        let (value, overflow) = number.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : value
    }

    static var defaultValueDescription: String { "bytes, or a number with K, M, G or T (powers of 1024)" }
}

extension CompressionMode: ExpressibleByArgument {
    public init?(argument: String) {
        switch argument {
        case "lz4": self = .lz4
        case "none": self = .none
        default: return nil
        }
    }

    public static var allValueStrings: [String] { ["lz4", "none"] }
}

struct StandardError: TextOutputStream {
    /// A closed or full stderr loses the message; it must not crash the command.
    mutating func write(_ string: String) { try? FileHandle.standardError.write(contentsOf: Data(string.utf8)) }
}

/// Writes to `handle`, turning a failure (full disk, closed pipe) into a PoolError instead
/// of Foundation's trapping `write(_:)`.
func writeOut(_ data: Data, to handle: FileHandle = .standardOutput, what: String = "standard output") throws {
    do {
        try handle.write(contentsOf: data)
    } catch {
        throw PoolError.io(errno: (error as NSError).code == 0 ? EIO : Int32((error as NSError).code), operation: "write to \(what)", byteOffset: 0)
    }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    var data = try encoder.encode(value)
    data.append(contentsOf: Array("\n".utf8))
    try writeOut(data)
}

/// `list --json` rows: `origin` is always present, null when there is none.
struct VolumeRow: Encodable {
    var info: VolumeInfo

    enum Keys: String, CodingKey {
        case name, kind, sizeBytes, mappedBytes, allocatedBytes, exclusiveBytes, origin, createdTime
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: Keys.self)
        try c.encode(info.name, forKey: .name)
        try c.encode(info.kind, forKey: .kind)
        try c.encode(info.sizeBytes, forKey: .sizeBytes)
        try c.encode(info.mappedBytes, forKey: .mappedBytes)
        try c.encode(info.allocatedBytes, forKey: .allocatedBytes)
        try c.encode(info.exclusiveBytes, forKey: .exclusiveBytes)
        try c.encode(info.origin, forKey: .origin)
        try c.encode(info.createdTime, forKey: .createdTime)
    }
}

func formatBytes(_ bytes: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    return unit == 0 ? "\(bytes) B" : String(format: "%.1f %@", value, units[unit])
}

func printTable(_ rows: [[String]]) {
    guard let first = rows.first else { return }
    var widths = [Int](repeating: 0, count: first.count)
    for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
    for row in rows {
        let line = row.enumerated().map { i, cell in
            i == 0 ? cell.padding(toLength: widths[i], withPad: " ", startingAt: 0)
                : String(repeating: " ", count: widths[i] - cell.count) + cell
        }.joined(separator: "  ")
        print(line)
    }
}

/// Opens `path` read-write, runs `body`, and closes (checkpointing) the pool, also when
/// `body` fails, so a refused command leaves the pool cleanly closed.
func withWritablePool(_ path: String, _ body: (Pool) throws -> Void) throws {
    let pool = try Pool.open(at: path)
    do {
        try body(pool)
    } catch {
        try? pool.close()
        throw error
    }
    try pool.close()
}

func printVolumeTable(_ rows: [VolumeInfo]) {
    var table = [["NAME", "KIND", "SIZE", "ALLOCATED", "EXCLUSIVE", "ORIGIN"]]
    for r in rows {
        table.append([r.name, r.kind, formatBytes(r.sizeBytes), formatBytes(r.allocatedBytes), formatBytes(r.exclusiveBytes), r.origin ?? "-"])
    }
    printTable(table)
}
