"""The statement kinds guardproxy knows, by root parse node.

One entry per pglast statement node: its `StatementClass` and the command tag used
in messages. A root node that is not listed here is *unsupported* and the policy
engine denies it (fail closed): a new Postgres version adding a statement kind must
be looked at before agents may use it.

`QUERY_NODES` lists the node types that may appear inside the statements whose
content the engine judges in detail (reads, writes, cursors, prepared statements,
session and transaction control). Any other node type found in such a statement is
reported as unsupported: it might carry a relation or a function call the collector
does not know how to find. DDL and admin statements are gated as a whole by their
class, so their inner node types are not restricted.
"""

from __future__ import annotations

from .model import StatementClass as C

# Root node class name -> (class, command tag). Classes that depend on the content
# (COPY direction, LOCK mode, EXPLAIN's inner statement...) are refined by the collector.
STATEMENTS: dict[str, tuple[C, str]] = {
    # queries and DML
    "SelectStmt": (C.READ, "SELECT"),
    "InsertStmt": (C.WRITE, "INSERT"),
    "UpdateStmt": (C.WRITE, "UPDATE"),
    "DeleteStmt": (C.WRITE, "DELETE"),
    "MergeStmt": (C.WRITE, "MERGE"),
    "TruncateStmt": (C.WRITE, "TRUNCATE"),
    "CopyStmt": (C.READ, "COPY"),
    "ExplainStmt": (C.READ, "EXPLAIN"),
    "LockStmt": (C.READ, "LOCK"),
    # cursors and prepared statements
    "DeclareCursorStmt": (C.CURSOR, "DECLARE CURSOR"),
    "FetchStmt": (C.CURSOR, "FETCH"),
    "ClosePortalStmt": (C.CURSOR, "CLOSE"),
    "PrepareStmt": (C.PREPARED, "PREPARE"),
    "ExecuteStmt": (C.PREPARED, "EXECUTE"),
    "DeallocateStmt": (C.PREPARED, "DEALLOCATE"),
    # transaction and session control
    "TransactionStmt": (C.TRANSACTION, "TRANSACTION"),
    "ConstraintsSetStmt": (C.TRANSACTION, "SET CONSTRAINTS"),
    "VariableSetStmt": (C.SESSION, "SET"),
    "VariableShowStmt": (C.SESSION, "SHOW"),
    "DiscardStmt": (C.SESSION, "DISCARD"),
    "UnlistenStmt": (C.SESSION, "UNLISTEN"),
    "ListenStmt": (C.NOTIFY, "LISTEN"),
    "NotifyStmt": (C.NOTIFY, "NOTIFY"),
    # code the proxy cannot see into
    "DoStmt": (C.CODE, "DO"),
    "CallStmt": (C.CODE, "CALL"),
    # schema objects
    "CreateStmt": (C.DDL, "CREATE TABLE"),
    "CreateTableAsStmt": (C.DDL, "CREATE TABLE AS"),
    "CreateForeignTableStmt": (C.DDL, "CREATE FOREIGN TABLE"),
    "AlterTableStmt": (C.DDL, "ALTER TABLE"),
    "DropStmt": (C.DDL, "DROP"),
    "IndexStmt": (C.DDL, "CREATE INDEX"),
    "ViewStmt": (C.DDL, "CREATE VIEW"),
    "CreateFunctionStmt": (C.DDL, "CREATE FUNCTION"),
    "AlterFunctionStmt": (C.DDL, "ALTER FUNCTION"),
    "RuleStmt": (C.DDL, "CREATE RULE"),
    "CreateTrigStmt": (C.DDL, "CREATE TRIGGER"),
    "CreateSeqStmt": (C.DDL, "CREATE SEQUENCE"),
    "AlterSeqStmt": (C.DDL, "ALTER SEQUENCE"),
    "CreateSchemaStmt": (C.DDL, "CREATE SCHEMA"),
    "CommentStmt": (C.DDL, "COMMENT"),
    "RenameStmt": (C.DDL, "RENAME"),
    "AlterObjectSchemaStmt": (C.DDL, "ALTER SET SCHEMA"),
    "AlterObjectDependsStmt": (C.DDL, "ALTER DEPENDS ON EXTENSION"),
    "CompositeTypeStmt": (C.DDL, "CREATE TYPE"),
    "CreateEnumStmt": (C.DDL, "CREATE TYPE"),
    "AlterEnumStmt": (C.DDL, "ALTER TYPE"),
    "CreateRangeStmt": (C.DDL, "CREATE TYPE"),
    "AlterTypeStmt": (C.DDL, "ALTER TYPE"),
    "CreateDomainStmt": (C.DDL, "CREATE DOMAIN"),
    "AlterDomainStmt": (C.DDL, "ALTER DOMAIN"),
    "DefineStmt": (C.DDL, "CREATE"),
    "AlterOperatorStmt": (C.DDL, "ALTER OPERATOR"),
    "CreateStatsStmt": (C.DDL, "CREATE STATISTICS"),
    "AlterStatsStmt": (C.DDL, "ALTER STATISTICS"),
    "AlterCollationStmt": (C.DDL, "ALTER COLLATION"),
    "AlterTSConfigurationStmt": (C.DDL, "ALTER TEXT SEARCH CONFIGURATION"),
    "AlterTSDictionaryStmt": (C.DDL, "ALTER TEXT SEARCH DICTIONARY"),
    "CreateOpClassStmt": (C.DDL, "CREATE OPERATOR CLASS"),
    "CreateOpFamilyStmt": (C.DDL, "CREATE OPERATOR FAMILY"),
    "AlterOpFamilyStmt": (C.DDL, "ALTER OPERATOR FAMILY"),
    "CreateConversionStmt": (C.DDL, "CREATE CONVERSION"),
    "CreateCastStmt": (C.DDL, "CREATE CAST"),
    "CreateTransformStmt": (C.DDL, "CREATE TRANSFORM"),
    # administration, security and server-wide objects
    "RefreshMatViewStmt": (C.ADMIN, "REFRESH MATERIALIZED VIEW"),
    "VacuumStmt": (C.ADMIN, "VACUUM"),
    "ClusterStmt": (C.ADMIN, "CLUSTER"),
    "ReindexStmt": (C.ADMIN, "REINDEX"),
    "CheckPointStmt": (C.ADMIN, "CHECKPOINT"),
    "LoadStmt": (C.ADMIN, "LOAD"),
    "AlterSystemStmt": (C.ADMIN, "ALTER SYSTEM"),
    "CreateRoleStmt": (C.ADMIN, "CREATE ROLE"),
    "AlterRoleStmt": (C.ADMIN, "ALTER ROLE"),
    "AlterRoleSetStmt": (C.ADMIN, "ALTER ROLE SET"),
    "DropRoleStmt": (C.ADMIN, "DROP ROLE"),
    "GrantStmt": (C.ADMIN, "GRANT"),
    "GrantRoleStmt": (C.ADMIN, "GRANT ROLE"),
    "AlterDefaultPrivilegesStmt": (C.ADMIN, "ALTER DEFAULT PRIVILEGES"),
    "AlterOwnerStmt": (C.ADMIN, "ALTER OWNER"),
    "ReassignOwnedStmt": (C.ADMIN, "REASSIGN OWNED"),
    "DropOwnedStmt": (C.ADMIN, "DROP OWNED"),
    "CreatePolicyStmt": (C.ADMIN, "CREATE POLICY"),
    "AlterPolicyStmt": (C.ADMIN, "ALTER POLICY"),
    "SecLabelStmt": (C.ADMIN, "SECURITY LABEL"),
    "CreatedbStmt": (C.ADMIN, "CREATE DATABASE"),
    "AlterDatabaseStmt": (C.ADMIN, "ALTER DATABASE"),
    "AlterDatabaseSetStmt": (C.ADMIN, "ALTER DATABASE SET"),
    "AlterDatabaseRefreshCollStmt": (C.ADMIN, "ALTER DATABASE REFRESH COLLATION"),
    "DropdbStmt": (C.ADMIN, "DROP DATABASE"),
    "CreateTableSpaceStmt": (C.ADMIN, "CREATE TABLESPACE"),
    "DropTableSpaceStmt": (C.ADMIN, "DROP TABLESPACE"),
    "AlterTableSpaceOptionsStmt": (C.ADMIN, "ALTER TABLESPACE"),
    "AlterTableMoveAllStmt": (C.ADMIN, "ALTER TABLE ALL IN TABLESPACE"),
    "CreateExtensionStmt": (C.ADMIN, "CREATE EXTENSION"),
    "AlterExtensionStmt": (C.ADMIN, "ALTER EXTENSION"),
    "AlterExtensionContentsStmt": (C.ADMIN, "ALTER EXTENSION"),
    "CreateFdwStmt": (C.ADMIN, "CREATE FOREIGN DATA WRAPPER"),
    "AlterFdwStmt": (C.ADMIN, "ALTER FOREIGN DATA WRAPPER"),
    "CreateForeignServerStmt": (C.ADMIN, "CREATE SERVER"),
    "AlterForeignServerStmt": (C.ADMIN, "ALTER SERVER"),
    "CreateUserMappingStmt": (C.ADMIN, "CREATE USER MAPPING"),
    "AlterUserMappingStmt": (C.ADMIN, "ALTER USER MAPPING"),
    "DropUserMappingStmt": (C.ADMIN, "DROP USER MAPPING"),
    "ImportForeignSchemaStmt": (C.ADMIN, "IMPORT FOREIGN SCHEMA"),
    "CreatePublicationStmt": (C.ADMIN, "CREATE PUBLICATION"),
    "AlterPublicationStmt": (C.ADMIN, "ALTER PUBLICATION"),
    "CreateSubscriptionStmt": (C.ADMIN, "CREATE SUBSCRIPTION"),
    "AlterSubscriptionStmt": (C.ADMIN, "ALTER SUBSCRIPTION"),
    "DropSubscriptionStmt": (C.ADMIN, "DROP SUBSCRIPTION"),
    "CreateEventTrigStmt": (C.ADMIN, "CREATE EVENT TRIGGER"),
    "AlterEventTrigStmt": (C.ADMIN, "ALTER EVENT TRIGGER"),
    "CreatePLangStmt": (C.ADMIN, "CREATE LANGUAGE"),
    "CreateAmStmt": (C.ADMIN, "CREATE ACCESS METHOD"),
}

#: Statement classes whose inner node types are restricted to `QUERY_NODES`.
DETAILED_CLASSES = frozenset(
    {C.READ, C.WRITE, C.CURSOR, C.PREPARED, C.TRANSACTION, C.SESSION, C.NOTIFY, C.CODE}
)

#: Node types understood inside detailed statements (see module docstring).
QUERY_NODES = frozenset(
    {
        # statements that may nest (EXPLAIN, PREPARE, DECLARE, COPY, CTEs, sublinks)
        "SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt",
        "ExplainStmt", "CopyStmt", "DeclareCursorStmt", "PrepareStmt", "ExecuteStmt",
        "CallStmt", "DoStmt", "LockStmt", "TruncateStmt", "FetchStmt", "ClosePortalStmt",
        "DeallocateStmt", "TransactionStmt", "ConstraintsSetStmt", "VariableSetStmt",
        "VariableShowStmt", "DiscardStmt", "ListenStmt", "NotifyStmt", "UnlistenStmt",
        # query structure
        "WithClause", "CommonTableExpr", "CTESearchClause", "CTECycleClause",
        "RangeVar", "RangeSubselect", "RangeFunction", "RangeTableSample",
        "RangeTableFunc", "RangeTableFuncCol", "JoinExpr", "Alias", "IntoClause",
        "ResTarget", "SortBy", "WindowDef", "GroupingSet", "LockingClause",
        "OnConflictClause", "InferClause", "IndexElem", "MergeWhenClause",
        "ReturningClause", "ReturningOption", "MultiAssignRef", "SetToDefault",
        "CurrentOfExpr", "DefElem", "TypeName", "RoleSpec", "CollateClause",
        "ColumnDef",  # column definition lists of functions in FROM: AS x(a int)
        # expressions
        "A_Const", "A_Expr", "A_Star", "A_Indices", "A_Indirection", "A_ArrayExpr",
        "ColumnRef", "ParamRef", "FuncCall", "NamedArgExpr", "TypeCast", "BoolExpr",
        "BooleanTest", "NullTest", "CaseExpr", "CaseWhen", "CoalesceExpr", "MinMaxExpr",
        "RowExpr", "SubLink", "SQLValueFunction", "GroupingFunc", "MergeSupportFunc",
        "XmlExpr", "XmlSerialize", "String", "Integer", "Float", "Boolean", "BitString",
        # SQL/JSON syntax (expressions only: none of them runs SQL held in a string)
        "JsonAggConstructor", "JsonArgument", "JsonArrayAgg", "JsonArrayConstructor",
        "JsonArrayQueryConstructor", "JsonBehavior", "JsonFormat", "JsonFuncExpr",
        "JsonIsPredicate", "JsonKeyValue", "JsonObjectAgg", "JsonObjectConstructor",
        "JsonOutput", "JsonParseExpr", "JsonReturning", "JsonScalarExpr",
        "JsonSerializeExpr", "JsonTable", "JsonTableColumn", "JsonTablePathSpec",
        "JsonValueExpr",
    }
)  # fmt: skip

# LOCK TABLE modes (lockdefs.h); modes above ROW SHARE block writers, so they need
# the write class.
LOCK_MODES = {
    1: "ACCESS SHARE",
    2: "ROW SHARE",
    3: "ROW EXCLUSIVE",
    4: "SHARE UPDATE EXCLUSIVE",
    5: "SHARE",
    6: "SHARE ROW EXCLUSIVE",
    7: "EXCLUSIVE",
    8: "ACCESS EXCLUSIVE",
}
LOCK_MODES_FOR_READERS = frozenset({1, 2})
